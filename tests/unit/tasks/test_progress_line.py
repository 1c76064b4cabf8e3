"""Training report lines carry a progress bar, elapsed time and the time left."""

from tasks.ray_cluster import worker_cpus
from tasks.train.worker_loop import progress_line


def test_progress_line_shows_bar_share_and_eta():
    line = progress_line("fm", {"step": 500, "fm_loss": 0.41}, 2000, 0, 61.0)
    assert line.startswith("[fm] [#####...............] 500/2000 25% 1m01s<3m03s")
    assert line.endswith("fm_loss=0.41")
    # a resumed run estimates from the steps it made itself
    resumed = progress_line("cafm", {"step": 1500}, 2000, 1000, 100.0)
    assert "1500/2000 75% 1m40s<1m40s" in resumed


def test_worker_cpus_split_the_machine_unless_given(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_cpus(2, None) == 4 and worker_cpus(3, None) == 2 and worker_cpus(16, None) == 1
    assert worker_cpus(2, 3) == 3
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert worker_cpus(2, None) == 1
