"""The fork probe of ``startup.py``: pre-load like the zygote, fork one `gossip-train peer`.

``python benchmarks/_fork_probe.py SPEC_JSON`` (dataset, data_dir, warm, run_dir) imports
torch and the trainer and loads the data set as trainer/launch/zygote.py does (with
``warm``, also builds one throwaway Adam optimizer), forks one ``gossip-train peer
--events jsonl`` training 0.01 epoch, reads its events from a pipe and prints ``RESULT
<json>``: seconds from the fork to its ``listening`` and ``started`` events, the child's
CPU seconds and its exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time

from common import print_result


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    import torch

    torch.set_num_threads(1)
    import trainer.cli
    import trainer.peer  # noqa: F401 - what the zygote imports
    from trainer.data import dataset_for

    dataset_for(spec["dataset"], spec["data_dir"])
    if spec["warm"]:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    argv = ["peer", "--events", "jsonl", "--run-dir", spec["run_dir"], "--threads", "1",
            "--epochs", "0.01", "--dataset", spec["dataset"]]  # fmt: skip
    if spec["data_dir"]:
        argv += ["--data-dir", spec["data_dir"]]
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    forked = time.time()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.dup2(write_fd, 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os._exit(trainer.cli.main(argv))
    os.close(write_fd)
    seen: dict[str, float] = {}
    with os.fdopen(read_fd) as events:
        for line in events:
            ev = json.loads(line)
            seen.setdefault(ev["kind"], ev["ts"] - forked)
    _, status, usage = os.wait4(pid, 0)
    print_result(
        {
            "listening_s": seen.get("listening"),
            "started_s": seen.get("started"),
            "child_cpu_s": usage.ru_utime + usage.ru_stime,
            "exit": os.waitstatus_to_exitcode(status),
        }
    )


if __name__ == "__main__":
    main(sys.argv[1])
