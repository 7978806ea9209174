"""The README's detached recipes, run as written: `nohup ... &` typed into an interactive
shell on a real terminal that is then closed, the same line in a script, and `tmux new`
on a terminal that is closed. A signal ignored when the run starts (nohup's SIGHUP, the
SIGINT a script's background job is started with) stays ignored.

Each recipe needs a process of its own (and a shell, tmux); the rule itself is also
checked in the test's process, on StopRequests."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, default_stop_signals, read_metrics, train_lines, write_corpus

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals, terminals and shells of POSIX")

# Long enough to be running when the terminal closes; ended by SIGTERM (or, in tmux, by finishing).
ARGS = [*FAST, "--max-steps", "100000", "--checkpoint-interval", "1000", "--eval-steps", "1000"]


def readme_recipe(marker: str) -> str:
    """The line of the README's overnight block whose comment is `marker` (# Linux, ...)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Overnight: detached")[1].split("```bash\n")[1].split("```")[0]
    (line,) = [line for line in block.splitlines() if line.rstrip().endswith(f"# {marker}")]
    return line.rsplit("#", 1)[0].strip()


def as_run_here(recipe: str, args) -> str:
    """The recipe with `--model ...` replaced by this test's settings (no character a shell would read)."""
    words = " ".join(map(str, args))
    assert re.fullmatch(r"[\w./ :=+-]*", words), words
    assert "--model ..." in recipe, recipe
    return recipe.replace("--model ...", words)


def prepared(tmp_path: Path, data: Path, marker: str, *extra) -> tuple[Path, dict, Path, str]:
    """(working folder, environment, run folder, the README line marked `marker` as run here)."""
    folder, env = shell_folder(tmp_path)
    out = tmp_path / "out"
    return folder, env, out, as_run_here(readme_recipe(marker), [*ARGS, *extra, "--data-dir", data, "--output-dir", out])


def shell_folder(tmp_path: Path) -> tuple[Path, dict]:
    """A working folder where `python src/train_qlora.py` is this project's, and `python` this interpreter."""
    folder = tmp_path / "shell"
    folder.mkdir()
    (folder / "src").symlink_to(REPO / "src")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", TERM="xterm", TMUX_TMPDIR=str(tmp_path))
    for name in ("PYTHONPATH", "TMUX", "PROMPT_COMMAND"):
        env.pop(name, None)
    return folder, env


class Terminal:
    """An interactive bash on a new terminal (a pty), with job control, as a user has one."""

    def __init__(self, folder: Path, env: dict):
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: the shell, its terminal the pty
            try:
                default_stop_signals()
                os.chdir(folder)
                os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
            finally:
                os._exit(127)
        self.screen = b""

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def drain(self, seconds: float = 0.01) -> None:
        if select.select([self.master], [], [], seconds)[0]:
            try:
                self.screen += os.read(self.master, 65536)
            except OSError:
                pass

    def wait_for(self, predicate, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; the terminal showed: {self.screen[-2000:]!r}"
            self.drain()

    def close(self) -> int:
        """The terminal goes away (its window closed, the ssh session dropped): the shell gets SIGHUP."""
        os.close(self.master)
        _, status = os.waitpid(self.pid, 0)
        return status


def steps(out: Path) -> int:
    try:
        return len(train_lines(out))
    except (FileNotFoundError, ValueError):  # not yet there, or a line being written
        return 0


def ended(out: Path) -> dict | None:
    try:
        last = read_metrics(out)[-1]
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return last if last.get("event") == "end" else None


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie of a parent that is not this test)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.02)


def started_on_a_terminal_then_closed(recipe: str, folder: Path, env: dict, out: Path) -> int:
    """`recipe` typed into an interactive shell on a terminal; once the run has taken 3 steps, the
    terminal goes away (bash resends the SIGHUP to its jobs, then exits). Returns what `$!` named."""
    terminal = Terminal(folder, env)
    terminal.type(recipe)
    terminal.type("echo $! > run.pid")
    terminal.wait_for(lambda: steps(out) >= 3)
    terminal.close()
    return int((folder / "run.pid").read_text())


def still_training(out: Path) -> None:
    before = steps(out)
    wait_until(lambda: steps(out) >= before + 5 or ended(out), what="5 more steps")
    assert not ended(out), read_metrics(out)[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), train=200)


# ------------------------------------------------------------ in the test's process


@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ignored_on_entry_stays_ignored(ignored):
    from run_safety.stop_signals import StopRequests

    other = signal.SIGTERM if ignored != signal.SIGTERM else signal.SIGHUP
    previous = signal.signal(ignored, signal.SIG_IGN)
    previous_other = signal.signal(other, signal.SIG_DFL)  # not ignored on entry (the suite may run under nohup)
    try:
        with StopRequests() as stops:
            assert signal.getsignal(ignored) == signal.SIG_IGN
            os.kill(os.getpid(), ignored)
            time.sleep(0.01)  # a caught signal runs its handler at the next bytecode
            assert stops.signal is None
            # The others are still caught.
            os.kill(os.getpid(), other)
            time.sleep(0.01)
            assert stops.signal == other
        assert signal.getsignal(ignored) == signal.SIG_IGN
    finally:
        signal.signal(ignored, previous)
        signal.signal(other, previous_other)


# ------------------------------------------------------------ nohup


def test_nohup_on_a_terminal_then_the_terminal_closed_and_kill_hup_the_run_goes_on(data, tmp_path):
    folder, env, out, recipe = prepared(tmp_path, data, "Linux", "--auto-resume")
    assert recipe.startswith("nohup python src/train_qlora.py") and recipe.endswith("> train.log 2>&1 &"), recipe
    pid = None
    try:
        pid = started_on_a_terminal_then_closed(recipe, folder, env, out)
        os.kill(pid, signal.SIGHUP)  # and a `kill -HUP` of the run itself
        still_training(out)
        os.kill(pid, signal.SIGTERM)  # how a detached run is stopped
        wait_until(lambda: ended(out) and gone(pid), what="the run to stop after SIGTERM")
    finally:
        if pid is not None and not gone(pid):
            os.kill(pid, signal.SIGKILL)
    log = (folder / "train.log").read_text()
    assert "SIGHUP" not in log and "Traceback" not in log, log
    end = ended(out)
    step = train_lines(out)[-1]["step"]
    assert end["reason"] == f"interrupted by SIGTERM at step {step}", end
    assert (out / "checkpoints" / "final").read_text().strip() == f"step-{step:08d}"


def test_nohup_in_a_script_ignores_sigint_and_sighup_and_stops_on_sigterm(data, tmp_path):
    """A shell without job control starts `cmd &` with SIGINT ignored (so the script's Ctrl+C
    does not reach it); nohup adds SIGHUP. Both stay ignored; SIGTERM stops the run (143)."""
    folder, env, out, recipe = prepared(tmp_path, data, "Linux")
    script = f"{recipe}\necho $! > run.pid\nwait $!\necho $? > run.rc\n"
    shell = subprocess.Popen(["bash", "-c", script], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                             preexec_fn=default_stop_signals)
    try:
        wait_until(lambda: steps(out) >= 3, what="the first steps")
        pid = int((folder / "run.pid").read_text())
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGINT):
            os.kill(pid, sig)
        still_training(out)
        os.kill(pid, signal.SIGTERM)
        assert shell.wait(timeout=120) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
    log = (folder / "train.log").read_text()
    assert (folder / "run.rc").read_text().strip() == "143", log
    assert "SIGINT" not in log and "SIGHUP" not in log and "Traceback" not in log, log
    assert ended(out)["reason"].startswith("interrupted by SIGTERM at step")


def test_the_macos_line_as_written(data, tmp_path):
    if shutil.which("caffeinate") is None:
        pytest.skip("caffeinate is macOS's: not on this system, so the macOS line was not run")
    folder, env, out, recipe = prepared(tmp_path, data, "macOS")
    caffeinate = started_on_a_terminal_then_closed(recipe, folder, env, out)  # nohup execs it: $! is its pid
    still_training(out)
    assert not gone(caffeinate)  # the run and what keeps the machine awake, both
    subprocess.run(["pkill", "-TERM", "-P", str(caffeinate)], check=False)  # the run: caffeinate's child
    wait_until(lambda: ended(out) and gone(caffeinate), what="the run, then caffeinate, to stop")
    assert ended(out)["reason"].startswith("interrupted by SIGTERM at step")


# ------------------------------------------------------------ tmux


def test_tmux_on_a_terminal_then_the_terminal_closed_the_run_finishes(data, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed here (apt-get install tmux, brew install tmux)")
    max_steps = 40
    folder, env, out, recipe = prepared(tmp_path, data, "or in tmux", "--max-steps", max_steps)
    assert recipe.startswith("tmux new -s train 'python src/train_qlora.py"), recipe
    terminal = Terminal(folder, env)
    try:
        terminal.type(recipe)
        terminal.wait_for(lambda: steps(out) >= 3)
        terminal.close()  # the tmux client goes with the terminal; its server and the run stay
        at_close = steps(out)
        assert at_close < max_steps
        wait_until(lambda: ended(out), what="the run to finish inside tmux")
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True, check=False)
    end = ended(out)
    assert end["reason"] == f"finished: reached --max-steps {max_steps}", end
    assert train_lines(out)[-1]["step"] == max_steps
