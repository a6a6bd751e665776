"""modules/shared_state.py (v1.10.1): State.begin(job), end(), interrupt()."""


class State:
    interrupted = False
    job = ""
    job_count = 0

    def __init__(self):
        self.calls = []

    def begin(self, job: str = "(unknown)"):
        self.calls.append(("begin", job))
        self.job = job

    def end(self):
        self.calls.append(("end",))
        self.job = ""

    def interrupt(self):
        self.interrupted = True
