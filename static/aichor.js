// Small behaviours shared by every page; the pages work without them (forms still submit).
"use strict";

// Project and engine pickers go as soon as a choice is made with the mouse. With the keyboard,
// arrows on a closed <select> change it at every step, so it goes on Enter or when focus leaves.
const stepKeys = new Set(["ArrowUp", "ArrowDown", "Home", "End", "PageUp", "PageDown"]);

document.addEventListener("keydown", (event) => {
  const select = event.target.closest && event.target.closest("select[data-autosubmit]");
  if (!select) return;
  if (event.key === "Enter" && select.dataset.pending) {
    event.preventDefault();
    select.form.requestSubmit();
  } else if (stepKeys.has(event.key) || event.key.length === 1) {
    select.dataset.keyboard = "1";
  }
});

document.addEventListener("change", (event) => {
  const select = event.target.closest("select[data-autosubmit]");
  if (!select || !select.form) return;
  if (select.dataset.keyboard) {
    select.dataset.pending = "1";
    delete select.dataset.keyboard;
  } else {
    select.form.requestSubmit();
  }
});

document.addEventListener("focusout", (event) => {
  const select = event.target.closest && event.target.closest("select[data-autosubmit]");
  if (select && select.dataset.pending) select.form.requestSubmit();
});

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  if (!source) return;
  const text = source.textContent.trim();
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // Clipboard API refused (plain http on a remote host): select the text for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1500);
});

// Runs ticked for Compare survive the table's live refresh (htmx swaps the rows every few
// seconds while runs are active): the ticks live in the page, the rows are re-ticked after each.
const comparePicks = new Set();

function showComparePicks() {
  const form = document.getElementById("compare-form");
  if (!form) return;
  document.querySelectorAll("input.compare-pick").forEach((box) => { box.checked = comparePicks.has(box.value); });
  // Ticked runs the current page no longer shows still count: hidden inputs carry them.
  form.querySelectorAll("input[type=hidden][name=e]").forEach((input) => input.remove());
  const shown = new Set([...document.querySelectorAll("input.compare-pick")].map((box) => box.value));
  comparePicks.forEach((id) => {
    if (shown.has(id)) return;
    const input = Object.assign(document.createElement("input"), { type: "hidden", name: "e", value: id });
    form.appendChild(input);
  });
  const n = comparePicks.size;
  form.querySelector("button").disabled = n < 2 || n > 10;
  form.querySelector("[data-compare-count]").textContent =
    n === 0 ? "Tick 2 to 10 runs to compare them." : `${n} run${n === 1 ? "" : "s"} ticked` + (n > 10 ? " (at most 10)" : "");
}

document.addEventListener("change", (event) => {
  const box = event.target.closest && event.target.closest("input.compare-pick");
  if (!box) return;
  if (box.checked) comparePicks.add(box.value); else comparePicks.delete(box.value);
  showComparePicks();
});
document.addEventListener("htmx:afterSwap", showComparePicks);
