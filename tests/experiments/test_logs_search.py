"""Search of a whole stored log (issue 16, part 3): every chunk is searched, the line numbers are
the viewer's, matching is case-insensitive and sees through colour codes."""

import pytest

from experiments import services
from experiments.logs import LogWriter, append_log
from experiments.logview import MAX_MATCHES, line_range, search

pytestmark = pytest.mark.django_db

STREAM = "process:worker-0"


@pytest.fixture
def experiment(project):
    return services.create_experiment(
        project=project, message="aichor[t.yaml]: x", manifest_path="aichor_manifests/t.yaml"
    )


@pytest.fixture
def large_log(experiment):
    """100 000 numbered lines (about 5 MiB, a score of chunks), as a fast workload prints."""
    pad = "0" * 40
    with LogWriter(experiment.pk, STREAM) as writer:
        for start in range(0, 100_000, 10_000):
            writer.write("".join(f"{i} {pad}\n" for i in range(start, start + 10_000)))
    return experiment


def test_a_line_deep_in_a_large_log_is_found_with_its_number(client, member_user, large_log):
    assert search(large_log.pk, STREAM, "98765 ") == ([(98765, "98765 " + "0" * 40)], False)
    # The number the viewer asks for around the hit shows that very line.
    assert line_range(large_log.pk, STREAM, 98765, 98766) == (98765, ["98765 " + "0" * 40])
    assert search(large_log.pk, STREAM, "99999 0") == ([(99999, "99999 " + "0" * 40)], False)
    assert search(large_log.pk, STREAM, "no such text") == ([], False)
    client.force_login(member_user)
    html = client.get(f"/experiments/{large_log.pk}/log/search/", {"stream": STREAM, "q": "98765 "}).content.decode()
    assert 'data-line="98765"' in html and "1 matching line;" in html


def test_many_matches_stop_at_the_first_ones_in_log_order(large_log):
    matches, truncated = search(large_log.pk, STREAM, "00000")
    assert truncated and [number for number, _ in matches] == list(range(MAX_MATCHES))


def test_case_colour_codes_and_one_match_per_line(experiment):
    append_log(
        experiment.pk,
        STREAM,
        "starting\n"
        "Epoch 3: \x1b[1mLoss\x1b[0m 0.42\n"
        "loss 0.42 and again loss 0.42\n"
        "\x1b[31mLOSS 0.42\x1b[0m\n"
        "loss 0.421 holds the text too\n"
        "LOSS 0.5\n",
    )
    matches, truncated = search(experiment.pk, STREAM, "loss 0.42")
    assert not truncated
    assert matches == [
        (1, "Epoch 3: Loss 0.42"),
        (2, "loss 0.42 and again loss 0.42"),
        (3, "LOSS 0.42"),
        (4, "loss 0.421 holds the text too"),
    ]
    assert search(experiment.pk, STREAM, "EPOCH 3") == ([(1, "Epoch 3: Loss 0.42")], False)


def test_line_numbers_hold_after_letters_whose_lower_case_is_longer(experiment):
    # "İ" lower-cases to two characters: the chunk is searched line by line, numbers unchanged.
    append_log(experiment.pk, STREAM, "first\n")
    append_log(experiment.pk, STREAM, "İSTANBUL\nstraße\nthe Target line\n")
    assert search(experiment.pk, STREAM, "target") == ([(3, "the Target line")], False)
    assert search(experiment.pk, STREAM, "STRASSE") == ([], False)  # no full case folding, as before
    assert search(experiment.pk, STREAM, "straße") == ([(2, "straße")], False)


def test_an_unfinished_last_line_and_a_query_across_lines(experiment):
    append_log(experiment.pk, STREAM, "alpha\nbeta")  # the workload's output so far ends mid-line
    assert search(experiment.pk, STREAM, "BETA") == ([(1, "beta")], False)
    assert search(experiment.pk, STREAM, "alpha\nbeta") == ([], False)  # a line holds no line break
