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
