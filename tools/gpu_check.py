"""The GPU half of ``tools/gpu_check.sh`` (run it through the script: it skips cleanly without a GPU).

Rows: CUDA vLLM generation; weight sync through vLLM's ``ipc`` engine (Megatron ranks -> colocated
engine, the runtime's choice on one node) with the engine's prompt log-probs equal to Megatron's
within 1e-2 (bf16); sleep / wake keeps the weights; one tiny RL step (``megacov train``, TE layer
spec when TransformerEngine is importable). Every row prints PASS/FAIL and seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    from megacov.config.schema import MegacovConfig
    from megacov.config.validate import plan_layout
    from megacov.models.core import transformer_engine_available
    from megacov.runtime.core import Runtime
    from megacov.tiny import build_model
    from megacov.verify.sync import SyncCheckWorker, collect_logprobs, max_abs_delta, random_sequences

    rows: list[tuple[str, bool, float, str]] = []
    work = tempfile.mkdtemp(prefix="megacov-gpu-check-")
    hf = build_model(os.path.join(work, "model"))
    cfg = MegacovConfig()
    cfg.model.path, cfg.model.dtype = hf, "bf16"
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.rollout.placement, cfg.rollout.engines, cfg.rollout.tp, cfg.rollout.sync_bucket_mb = "colocated", 1, 1, 64
    cfg.rollout.gpu_memory_utilization = 0.3
    runtime = Runtime(cfg, plan_layout(cfg), call_timeout_s=300)
    try:
        t = time.perf_counter()
        runtime.connect()
        engines = runtime.start_engines(hf)
        with open(os.path.join(hf, "config.json")) as fh:
            seqs = random_sequences(json.load(fh)["vocab_size"], 4, 24, 0)
        out = engines.generate([s[:8] for s in seqs], n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8, seed=0)
        rows.append(("CUDA vLLM generation", len(out) == 8 and all(s.token_ids for s in out),
                     time.perf_counter() - t, f"backend {engines.spec.transfer_backend}"))

        t = time.perf_counter()
        actor = runtime.start_group(SyncCheckWorker, (hf, 1, 1, 0), backend="nccl")
        actor.group.execute("perturb", 0.05, 1)
        reference = collect_logprobs(actor.group, seqs)
        stale = max_abs_delta(engines.score(seqs), reference)
        runtime.release_engines()
        report = runtime.sync()
        synced = max_abs_delta(engines.score(seqs), reference)
        rows.append((f"{report.transport} sync + log-probs", synced <= 1e-2 < stale, time.perf_counter() - t,
                     f"stale {stale:.3f}, synced {synced:.2e}, version {report.version}"))

        t = time.perf_counter()
        engines.sleep(level=1)
        engines.wake_up()
        after = max_abs_delta(engines.score(seqs), reference)
        rows.append(("sleep / wake keeps weights", after <= 1e-2, time.perf_counter() - t, f"{after:.2e}"))
    except Exception as exc:  # noqa: BLE001 - reported as a failed row
        rows.append(("runtime", False, 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    finally:
        runtime.close()
        import ray

        ray.shutdown()

    t = time.perf_counter()
    te = transformer_engine_available()
    cmd = [sys.executable, "-m", "megacov", "train", "examples/tiny/config.yaml", "trainer.total_steps=1",
           "trainer.sft_steps=0", "parallel.tp=1", f"trainer.output_dir={work}/runs", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:100]
    rows.append((f"tiny RL step ({'TE' if te else 'local'} spec)", proc.returncode == 0, time.perf_counter() - t, tail))

    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  result  seconds  detail")
    for name, ok, secs, detail in rows:
        print(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {secs:7.1f}  {detail}")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
