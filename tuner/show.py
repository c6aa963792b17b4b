"""`dynaflow-tune show RECORD`: one stored record in words (command-line text lives in the tuner)."""
from __future__ import annotations

from pathlib import Path

from dynaflow.runtime.devices import device_type
from dynaflow.runtime.store import StoredSchedule
from dynaflow.runtime.validate import clip
from dynaflow.runtime.telemetry import others_share
from dynaflow.runtime.timeline import overlap_text


def describe(record: StoredSchedule, path: Path | str | None = None) -> str:
    """A record, readable: what runs, why it was chosen, where it came from."""
    r, s = record, record.schedule
    streams = ", ".join(f"stream {i}: {'all SMs' if st.sm_share is None else f'{st.sm_share} SMs'}, priority {st.priority}"
                        for i, st in enumerate(s.streams))
    per_stream = {}
    for step in s.order:
        per_stream.setdefault(step.stream, []).append(f"{clip(step.op, 40)}/{step.nano}")
    lines = [f"record     {path}" if path else None,
             f"hardware   {r.hardware.key} ({r.hardware.name}, {r.hardware.num_sms} "
             f"{device_type(r.hardware.kind).unit})",
             "software   " + ", ".join(f"{k} {v}" for k, v in r.hardware.software.items() if v),
             f"workload   {r.workload.key}: {r.workload.num_decode} decode requests x {r.workload.context_len} context, "
             f"{r.workload.prefill_tokens} prefill tokens in {r.workload.num_prefill} request(s)",
             f"verdict    {verdict_line(r)}",
             f"throughput {r.tokens_per_s:,.0f} tokens/s, sequential {r.baseline_tokens_per_s:,.0f} tokens/s"
             + (f", {r.efficiency:.1%} of roofline" if r.efficiency is not None else ""),
             f"schedule   {clip(s.label)}: split {s.split_unit} {list(s.split_sizes) or 'whole'}, "
             f"{'CUDA graph' if s.cuda_graph else 'eager'}",
             f"streams    {streams}"]
    lines += [f"order      stream {k}: " + " ".join(v) for k, v in sorted(per_stream.items())] if per_stream else \
        ["order      default: nano-batch by nano-batch, ops in graph order"]
    if r.verdict == "winner":
        lines.append(f"why        {overlap_text(r.overlap)}")
        if r.no_overlap:
            lines.append(f"           {r.no_overlap}")
    if r.model:
        lines.append(f"model      {model_text(r.model)}")
    lines.append(f"machine    {machine_text(r)}")
    lines.append(f"origin     {r.space} space, study {r.study or '?'} trial {r.trial if r.trial is not None else '-'}"
                 f" ({r.storage or 'storage unknown'}), {r.created_at}")
    return "\n".join(line for line in lines if line is not None)


def verdict_line(r: StoredSchedule) -> str:
    """The verdict with the interval of what it names: the winner's, or, for a record holding the
    sequential schedule, the best candidate's as the candidate's."""
    interval = _interval(r)
    if r.verdict == "winner":
        return f"winner: {r.speedup:.3f}x over sequential{interval} (noise {r.speedup_spread:.1%} between rounds)"
    kind = "sequential best" if r.verdict == "sequential_best" else "inconclusive"
    short = (f"; {r.rounds} quiet paired round(s) counted, fewer than a verdict needs (5 unless "
             "--confirm-min-rounds said otherwise)" if kind == "inconclusive" and r.rounds is not None
             and r.rounds < 5 else "")
    if r.candidate_speedup is not None:
        return (f"{kind}: runs the sequential schedule; the best candidate measured {r.candidate_speedup:.3f}x{interval}"
                + short)
    if r.speedup_interval:  # a record from before candidate_speedup was kept
        return f"{kind}: runs the sequential schedule; the best candidate's{interval}"
    if r.busy_rounds:
        return (f"{kind}: runs the sequential schedule; the best candidates' {r.busy_rounds} paired rounds all ran "
                "while the machine was busy (no evidence)")
    return f"{kind}: runs the sequential schedule; no candidate was re-measured"


def _interval(r: StoredSchedule) -> str:
    if not r.speedup_interval:
        return ""
    level = f"{r.confidence:.1%}" if r.confidence else "95%"
    rounds = f" over {r.rounds} paired rounds" if r.rounds else ""
    return f" ({level} interval {r.speedup_interval[0]:.3f}-{r.speedup_interval[1]:.3f}x{rounds})"


def machine_text(r: StoredSchedule) -> str:
    """How busy the machine was while the verdict was confirmed."""
    if not r.busy:
        return "load not recorded (a record from before it was)"
    share = others_share(r.busy)
    if r.contended:
        quiet = "under contention (accepted): " + r.contended
    elif r.busy_rounds and not r.rounds:
        quiet = f"busy: all {r.busy_rounds} paired rounds left out of the evidence"
    elif r.busy_rounds and r.verdict == "inconclusive":  # its verdict says why; no claim of quiet beside it
        quiet = f"{r.rounds} quiet paired round(s) counted, {r.busy_rounds} busy one(s) left out"
    elif r.busy_rounds:
        quiet = f"quiet enough for the evidence ({r.rounds} quiet paired rounds; {r.busy_rounds} busy ones left out)"
    else:
        quiet = "quiet enough"
    parts = [f"other processes used {share:.0%} of the CPUs" if share is not None else None,
             f"load average {r.busy['load1']:g}" if r.busy.get("load1") is not None else None,
             f"{r.busy['gpu_other_processes']} other GPU process(es)" if r.busy.get("gpu_other_processes") else None]
    return f"{quiet} ({', '.join(p for p in parts if p)} over {r.busy.get('wall_s', 0):.1f} s of confirmation)"


def model_text(m: dict) -> str:
    """What the performance model said when the record was tuned (tuner/guide.py), in one line."""
    parts = [f"sequential predicted {m['sequential_predicted_ms']:.2f} ms, no schedule can beat "
             f"{m['bound_speedup']:.2f}x ({m['busiest']} the busiest)" if m.get("bound_speedup") else None,
             f"best predicted {m['best_predicted']:.3f}x" if m.get("best_predicted") is not None else None,
             f"the best candidate predicted {m['candidate_predicted']:.3f}x" if m.get("candidate_predicted") else None,
             "screened: only its top schedules were measured" if m.get("screened") else None]
    e = m.get("error") or {}
    if e.get("n"):
        rho = "n/a" if e.get("rho") is None else f"{e['rho']:.2f}"
        parts.append(f"its error that run: Spearman rho {rho} over {e['n']} schedule(s), median |error| "
                     f"{e['median_abs']:.1%}")
    return "; ".join(p for p in parts if p) or "no prediction kept"
