"""The test suite's fork server (tests/forkserver.py) answers as a new interpreter would."""

import subprocess
import sys

import pytest

from conftest import ROOT, run_script


@pytest.mark.fast
def test_a_forked_run_answers_as_a_new_interpreter(tmp_path):
    for argv in (["train_student.py", "--data-dir", tmp_path / "none", "--batch-size", "0"],
                 ["check_data.py", "--data-dir", tmp_path / "none"],
                 ["train_student.py", "--recipe", "consistant"]):
        forked = run_script(*argv, cwd=tmp_path)
        fresh = subprocess.run([sys.executable, str(ROOT / argv[0]), *map(str, argv[1:])],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (forked.returncode, forked.stdout, forked.stderr) == \
            (fresh.returncode, fresh.stdout, fresh.stderr)
        assert forked.returncode == 2 and forked.stderr.startswith("error:"), forked.stderr


@pytest.mark.fast
def test_a_forked_run_past_its_timeout_is_killed(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        run_script(sleeper, timeout=3)
    assert stopped.value.stdout == "started\n"
    # The server goes on serving.
    assert run_script("check_data.py", "--data-dir", tmp_path / "none").returncode == 2
