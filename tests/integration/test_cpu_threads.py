"""The intra-op thread count: the CPUs found (/proc, cgroup files), the choice, who overrides it, resume.

Machines are injected (files under tmp_path, or a Machine) so that no figure depends on this machine's load.
The suite pins OMP_NUM_THREADS (conftest.py); tests of the choice itself remove it, and every test here puts
torch's count back.
"""

import json

import pytest
import torch
from helpers import run_ckpt, train_args

from mbv2train import cpu_threads
from mbv2train.cpu_threads import Machine, ThreadChoice, choose
from mbv2train.errors import ConfigError

# these tests change and read back process-wide state (torch's thread count, the machine reading): one
# worker, in file order
pytestmark = pytest.mark.xdist_group("cpu_threads")

NO_ENV: dict = {}


@pytest.fixture(autouse=True)
def torch_threads_put_back(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_start", None)
    monkeypatch.setattr(cpu_threads, "_machine", None)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_thread_env(monkeypatch):
    """No thread variable, and torch's default taken as 2 threads, whatever this machine's is."""
    for name in cpu_threads.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_threads, "_torch_default", 2)


def machine(cpus=2, usable=None, others=None):
    return lambda: Machine(cpus, usable if usable is not None else cpus, others)


# ------------------------------------------------------------------------------------------- /proc readings

def cpu_line(name: str, busy: int, idle: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice: busy split over user, system and steal
    return f"{name} {busy - 3} 0 2 {idle - 1} 1 0 0 1 5 0"


def write_proc(proc, cpus: dict[int, tuple[int, int]], own: tuple[int, int, int, int] = (0, 0, 0, 0),
               children: dict[int, tuple[int, int]] = ()):
    """A fake /proc: stat with (busy, idle) ticks per CPU, self/stat with utime stime cutime cstime, and
    live children with their utime and stime."""
    total = [sum(v) for v in zip(*cpus.values())]
    lines = [cpu_line("cpu", total[0], total[1])] + [cpu_line(f"cpu{c}", *v) for c, v in cpus.items()]
    (proc / "self" / "task" / "7").mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text("\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n")
    rest = " ".join(["0"] * 30)
    (proc / "self" / "stat").write_text(f"7 (mbv2 (x) y) R 1 7 7 0 -1 0 0 0 0 0 {own[0]} {own[1]} {own[2]} {own[3]} "
                                        f"{rest}\n")
    (proc / "self" / "task" / "7" / "children").write_text(" ".join(str(pid) for pid in children) + " ")
    for pid, (utime, stime) in dict(children).items():
        (proc / str(pid)).mkdir(exist_ok=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (pt_worker) S 7 7 7 0 -1 0 0 0 0 0 {utime} {stime} 0 0 {rest}\n")


def test_other_processes_load_is_the_busy_time_of_the_allowed_cpus_less_this_process_s_own(tmp_path):
    write_proc(tmp_path, {0: (100, 100), 1: (100, 100), 2: (0, 500)}, own=(40, 10, 0, 0))
    first = cpu_threads.read_cpu_times({0, 1}, tmp_path)
    # 100 ticks elapse on each CPU: CPU 0 busy 95 of them, CPU 1 busy 90; this process ran 25 ticks.
    # CPU 2 is outside the affinity set: its load is no concern of this process.
    write_proc(tmp_path, {0: (195, 105), 1: (190, 110), 2: (100, 500)}, own=(60, 15, 0, 0))
    second = cpu_threads.read_cpu_times({0, 1}, tmp_path)
    assert sorted(first.cpus) == [0, 1]
    assert cpu_threads.others_busy(first, second) == pytest.approx((95 + 90 - 25) / 100)


def test_loader_workers_count_as_this_process_when_children_are_read(tmp_path):
    write_proc(tmp_path, {0: (0, 0), 1: (0, 0)}, own=(10, 0, 0, 0), children={11: (5, 0), 12: (5, 0)})
    first = cpu_threads.read_cpu_times({0, 1}, tmp_path, children=True)
    # worker 12 ended and was waited for: its 30 ticks moved to cstime/cutime
    write_proc(tmp_path, {0: (100, 0), 1: (100, 0)}, own=(60, 0, 20, 10), children={11: (55, 0)})
    second = cpu_threads.read_cpu_times({0, 1}, tmp_path, children=True)
    assert (first.own, second.own) == (20, 145)
    assert cpu_threads.others_busy(first, second) == pytest.approx((200 - 125) / 100)
    assert cpu_threads.read_cpu_times({0, 1}, tmp_path).own == 60  # without children: the process alone


def test_no_proc_means_no_reading(tmp_path):
    assert cpu_threads.read_cpu_times({0}, tmp_path / "missing") is None


def write_cgroup(proc, memberships: str):
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "cgroup").write_text(memberships)


def test_cpu_quota_is_cgroup_v2_cpu_max_the_smallest_on_the_way_up(tmp_path):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    write_cgroup(proc, "0::/jobs/train\n")
    (fs / "jobs" / "train").mkdir(parents=True)
    (fs / "jobs" / "train" / "cpu.max").write_text("max 100000\n")
    (fs / "jobs" / "cpu.max").write_text("250000 100000\n")
    (fs / "cpu.max").write_text("800000 100000\n")
    assert cpu_threads.cpu_quota(proc, fs) == 2.5
    (fs / "jobs" / "cpu.max").write_text("max 100000\n")
    (fs / "cpu.max").unlink()
    assert cpu_threads.cpu_quota(proc, fs) is None


def test_cpu_quota_is_cgroup_v1_cfs_quota_over_period(tmp_path):
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    write_cgroup(proc, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    mount = fs / "cpu,cpuacct"
    mount.mkdir(parents=True)  # inside the container its own cgroup is the mount's root
    (mount / "cpu.cfs_quota_us").write_text("150000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_threads.cpu_quota(proc, fs) == 1.5
    (mount / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_threads.cpu_quota(proc, fs) is None


@pytest.mark.parametrize("cpus, quota, usable", [(16, 2.5, 2), (2, None, 2), (4, 0.5, 1), (2, 8.0, 2)])
def test_usable_cpus_are_the_affinity_set_capped_by_whole_cpus_of_the_quota(cpus, quota, usable):
    assert cpu_threads.usable_cpus(cpus, quota) == usable


def test_the_machine_is_measured_from_the_command_s_start(tmp_path):
    cpus = cpu_threads.affinity()
    write_proc(tmp_path, {c: (0, 0) for c in cpus})
    cpu_threads.start_reading(tmp_path)
    waited = []

    def sleep(seconds):  # the command started a moment ago: the reading waits, and meanwhile every CPU is busy
        waited.append(seconds)
        write_proc(tmp_path, {c: (100, 0) for c in cpus})

    found = cpu_threads.measure_machine(tmp_path, tmp_path / "no-cgroup", sleep=sleep)
    assert 0 < waited[0] <= cpu_threads.MIN_INTERVAL_S
    assert found == Machine(len(cpus), len(cpus), float(len(cpus)))
    assert cpu_threads.measure_machine() is found  # once per command


# ------------------------------------------------------------------------------------------------ the choice

def test_a_busy_machine_gets_the_threads_other_processes_leave():
    assert choose(None, 0, None, NO_ENV, machine(2, others=1.9), default=2) == ThreadChoice(
        1, "auto", "threads: 1 of 2 CPUs (1.9 busy with other processes)")
    assert choose(None, 0, None, NO_ENV, machine(8, others=3.2), default=8).count == 5


def test_an_idle_machine_keeps_torch_s_default_without_a_word():
    assert choose(None, 0, None, NO_ENV, machine(2, others=0.3), default=2) == ThreadChoice(2, "auto", None)


def test_loader_workers_take_their_cpus_from_the_threads_quietly_as_every_run_does():
    assert choose(None, 2, None, NO_ENV, machine(4, others=0.0), default=4) == ThreadChoice(2, "auto", None)
    # a busy machine is news, and the line then gives every reason
    assert choose(None, 2, None, NO_ENV, machine(4, others=2.6), default=4) == ThreadChoice(
        1, "auto", "threads: 1 of 4 CPUs (2 for loader workers; 2.6 busy with other processes)")
    assert choose(None, 4, None, NO_ENV, machine(2, others=0.0), default=2).count == 1  # workers capped at 2


def test_a_cgroup_quota_caps_the_threads_and_other_processes_count_only_past_the_idle_cpus():
    assert choose(None, 0, None, NO_ENV, machine(16, usable=2, others=0.0), default=16) == ThreadChoice(
        2, "auto", "threads: 2 of 2 CPUs (the cgroup's CPU quota allows 2 of 16)")
    assert choose(None, 0, None, NO_ENV, machine(16, usable=2, others=13.0), default=16).count == 2
    assert choose(None, 0, None, NO_ENV, machine(16, usable=2, others=15.2), default=16).count == 1


def test_the_choice_never_exceeds_torch_s_default_or_drops_below_one():
    assert choose(None, 0, None, NO_ENV, machine(8, others=0.0), default=4).count == 4  # physical cores
    assert choose(None, 8, None, NO_ENV, machine(2, others=2.0), default=2).count == 1


def test_without_a_load_reading_the_choice_is_the_cpus_less_the_workers():
    assert choose(None, 1, None, NO_ENV, machine(4, others=None), default=4).count == 3


def test_thread_environment_variables_win_and_the_machine_is_not_even_measured():
    def unmeasured():
        raise AssertionError("measured")

    for env in ({"OMP_NUM_THREADS": "3"}, {"MKL_NUM_THREADS": "3"}):
        assert choose(1, 0, None, env, unmeasured, default=3) == ThreadChoice(3, "environment", None)
    assert choose(None, 0, None, {"OMP_NUM_THREADS": " "}, machine(2, others=1.9), default=2).source == "auto"
    resumed = choose(None, 0, 1, {"OMP_NUM_THREADS": "2"}, unmeasured, default=2)
    assert resumed.count == 2 and resumed.line == ("warning: OMP_NUM_THREADS=2 gives 2 threads; the run being "
                                                   "resumed used 1, so it will not repeat an uninterrupted run bit "
                                                   "for bit")


def test_train_threads_wins_over_the_automatic_choice():
    assert choose(2, 0, None, NO_ENV, machine(2, others=1.9), default=2) == ThreadChoice(2, "train.threads", None)
    assert choose(1, 0, None, NO_ENV, machine(2, others=0.0), default=2) == ThreadChoice(
        1, "train.threads", "threads: 1 (train.threads)")
    assert choose(3, 0, 2, NO_ENV, machine(), default=2).line.startswith("warning: threads: 3 (train.threads); the "
                                                                           "run being resumed used 2")


def test_a_resumed_run_keeps_the_count_it_was_started_with_and_says_so():
    busy = choose(None, 0, 2, NO_ENV, machine(2, others=1.9), default=2)
    assert busy == ThreadChoice(2, "resumed run", "threads: 2 of 2 CPUs, as the run being resumed used: an exact "
                                "resume needs its count (train.threads sets another); 1 otherwise (1.9 busy with "
                                "other processes)")
    idle = choose(None, 0, 1, NO_ENV, machine(2, others=0.0), default=2)
    assert idle.count == 1 and idle.line.startswith("threads: 1 of 2 CPUs, as the run being resumed used")
    assert choose(None, 0, 2, NO_ENV, machine(2, others=0.0), default=2) == ThreadChoice(2, "resumed run", None)


# -------------------------------------------------------------------------------------------------- applying

def test_use_sets_torch_s_count_unless_a_thread_variable_is_set(no_thread_env, monkeypatch):
    said = []
    choice = cpu_threads.use(None, 0, say=said.append, machine=machine(2, others=1.9))
    assert choice.count == 1 and torch.get_num_threads() == 1
    assert said == ["threads: 1 of 2 CPUs (1.9 busy with other processes)"]

    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads.use(1, 0, machine=machine(2, others=1.9)).source == "environment"
    assert torch.get_num_threads() == 2


def test_train_threads_must_be_a_positive_whole_number(tiny_config):
    with pytest.raises(ConfigError, match="train.threads"):
        tiny_config("train.threads=0")
    assert tiny_config("train.threads=3").train.threads == 3
    assert tiny_config().train.threads is None


def test_a_resumed_run_computes_with_the_thread_count_it_was_started_with(cli, image_root, tmp_path, monkeypatch,
                                                                          no_thread_env):
    run = tmp_path / "run"
    args = train_args(image_root, run, "train.tb_images=0", options=["--resume", "auto"])
    first = cli(*args, "--set", "train.epochs=1", "--set", "train.threads=2")
    assert first.exit_code == 0, first.output
    assert run_ckpt(run)["intra_op_threads"] == 2

    # the machine is busy now: a fresh run would take one thread, the resumed one keeps its two
    monkeypatch.setattr(cpu_threads, "measure_machine", machine(2, others=1.9))
    resumed = cli(*args, "--allow-change", "train.epochs")  # TINY_RUN's 2 epochs
    assert resumed.exit_code == 0, resumed.output
    assert ("threads: 2 of 2 CPUs, as the run being resumed used: an exact resume needs its count (train.threads "
            "sets another); 1 otherwise (1.9 busy with other processes)") in resumed.stdout
    saved = run_ckpt(run)
    assert (saved["epoch"], saved["intra_op_threads"]) == (2, 2)


def test_eval_chooses_its_threads_and_says_so_on_stderr(cli, tiny_config, tmp_path, monkeypatch, no_thread_env):
    from mbv2train.train.trainer import fit

    cfg = tiny_config("train.epochs=1", "train.tb_images=0", "train.threads=1")
    fit(cfg)
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "measure_machine", machine(2, others=1.9))
    result = cli("eval", "--ckpt", tmp_path / "run" / "best.pt", "--set", "train.threads=null", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 12  # stdout holds the JSON alone
    assert "threads: 1 of 2 CPUs (1.9 busy with other processes)" in result.stderr
    assert torch.get_num_threads() == 1


def test_every_command_reads_the_cpu_counters_as_it_starts(cli, monkeypatch):
    started = []
    monkeypatch.setattr(cpu_threads, "start_reading", lambda: started.append(True))
    assert cli("config", "show").exit_code == 0
    assert started == [True]
