"""docs/benchmarks.md, its chart and the printed summary, from the results JSON; and the cost model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TARGETS = {
    "tick_seconds_1000": 1.5,  # issue 19 (issue 9 asked < 2.5 s)
    "speedup_1000": 20.0,
    "idle_table_transactions_per_conversation_tick": 0.02,
    "idle_directline_requests_per_conversation_minute": 1.0,
    "reply_p50_share_of_timer": 0.3,
    "cold_start_import_ms": 400.0,
    # issue 19, with the default settings
    "late_reply_p50_seconds": 1.0,
    "late_reply_p95_seconds": 2.0,
    "idle_cost_growth": 0.10,  # idle Direct Line requests and table transactions per conversation-hour
    "fanout_conversations": 2000,  # due at once, worked by 4 hosts with no reply lost or doubled
    "fanout_hosts": 4,
}

# Published list prices (USD, pay-as-you-go, East US). Checked 2025 (see `source`): where a figure
# could not be confirmed against Microsoft's own pricing page it is marked an assumption.
FLEX_COSTS_DOC = ("Microsoft's Flex Consumption cost example, learn.microsoft.com/azure/azure-functions/"
                  "functions-consumption-costs (2025-02-10), which assumes this on-demand rate; not the price list")
PRICES: dict[str, dict[str, Any]] = {
    "flex_gb_second": {"usd": 0.000026, "unit": "GB-s of on-demand execution",
                       "source": f"{FLEX_COSTS_DOC}; the same figure in modal.com's Azure Functions pricing guide "
                                 "(22 May 2025)"},
    "flex_million_executions": {"usd": 0.40, "unit": "million on-demand executions", "source": FLEX_COSTS_DOC},
    "flex_free_gb_seconds": {"usd": 100_000, "unit": "GB-s free per month (on demand)",
                             "source": "assumption: as remembered (2025), not confirmed (Microsoft's billing table "
                                       "says there is an on-demand free grant, not how much)"},
    "flex_free_executions": {"usd": 250_000, "unit": "executions free per month (on demand)",
                             "source": "assumption: as remembered (2025), not confirmed"},
    "table_10k_transactions": {"usd": 0.00036, "unit": "10,000 Table transactions (Standard, LRS)",
                               "source": "assumption: Table Storage pricing page as remembered (2025), not confirmed"},
    "queue_10k_operations": {"usd": 0.0004, "unit": "10,000 Queue Storage operations (Standard, LRS)",
                             "source": "assumption: Queue Storage pricing page as remembered (2025), not confirmed"},
    "premium_channel_1k_messages": {"usd": 0.50, "unit": "1,000 Direct Line (premium channel) messages, S1",
                                    "source": "assumption: Bot Service pricing as remembered (2025), not "
                                              "confirmed; polling GETs are not messages"},
}
# Flex Consumption bills each instance's active period, at least 1,000 ms, then rounded up to 100 ms
# (learn.microsoft.com/azure/azure-functions/flex-consumption-plan, "Billing").
MIN_BILLABLE_SECONDS = 1.0
BILLING_STEP_SECONDS = 0.1
INSTANCE_GB = 2.0  # Flex Consumption's default instance memory (2,048 MB)
QUEUE_CONCURRENCY = 6  # messages one instance works at once: host.json extensions.queues batchSize + newBatchThreshold
MESSAGES_PER_CONVERSATION = 10  # user messages a day's conversation brings (and as many bot replies)
OPEN_HOURS_PER_CONVERSATION = 24  # idle until RELAY_IDLE_TIMEOUT_MINUTES (1440) ends it
DAYS_PER_MONTH = 30
MONTH_SECONDS = DAYS_PER_MONTH * 86_400
VOLUMES = (100, 1_000, 10_000)  # conversations a day
SECTIONS = ("ticks", "idle", "latency", "inbound", "cold_start", "latency_cost", "seed", "fanout")  # `make bench`
LATENCY_COST_CHART = "benchmarks-latency-cost.png"
FANOUT_CHART = "benchmarks-fanout.png"
# The capacity model (fan-out): how many open conversations are in an exchange (a message within the last 2
# minutes: polled every REPLY_LIKELY_GAP), the rest idle at the ceiling. Assumptions, not measurements.
CAPACITY_CONVERSATIONS = (10_000, 100_000)
EXCHANGE_SHARE = 0.10
EXCHANGE_POLL_SECONDS = 5.0  # relay/conversations.py REPLY_LIKELY_GAP
IDLE_POLL_SECONDS = 60.0  # RELAY_POLL_CEILING_SECONDS' default
INSTANCE_VCPUS = 1.0  # assumption: a 2,048 MB Flex Consumption instance has about one vCPU (not confirmed)


def billed_seconds(seconds: float) -> float:
    """What Flex Consumption bills for an execution of `seconds` on an otherwise idle instance."""
    return max(MIN_BILLABLE_SECONDS, math.ceil(round(seconds / BILLING_STEP_SECONDS, 6)) * BILLING_STEP_SECONDS)


def busy_instances(running: float, *, per_instance: int = QUEUE_CONCURRENCY) -> float:
    """The mean number of instances busy when executions arrive at random (Poisson) and `running` are under way
    on average, each instance working up to `per_instance` at once: E[ceil(N / per_instance)], N ~ Poisson."""
    if running <= 0:
        return 0.0
    probability, total, n = math.exp(-running), 0.0, 0
    while n <= running + 12 * math.sqrt(running) + 30:
        total += probability * math.ceil(n / per_instance)
        n += 1
        probability *= running / n
    return total


def cost_model(results: dict[str, Any], idle: dict[str, Any] | None = None,
               chase: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Monthly usage and cost for 100, 1,000 and 10,000 conversations a day, from the measured counts: the timer
    ticking as the idle hour did (`idle`, the idle section's unless given), each tick costing the due-index
    query (the fixed cost per tick) plus what each due conversation adds; with `chase` (candidates.chase_cost),
    a chase per user message: its looks, each an execution as long as the measured look with its record read
    and queue transactions, and its Direct Line GETs. Looks overlap (a chase's every second, many chases at
    once), so they are billed as the instances they keep busy (busy_instances), not one active period each."""
    idle = idle or results["idle"]
    ticks = results["ticks"]
    hook_burst = results["webhook_cost_burst"]
    tick_interval = idle["tick_seconds"]
    ticks_per_month = MONTH_SECONDS / tick_interval
    per_conv_second = ticks[-1]["relay"]["seconds"] / ticks[-1]["conversations"]
    empty_tick = idle["empty_tick_seconds"]
    fixed_tx = idle.get("fixed_table_transactions_per_tick", 1)
    idle_tx_hour = (idle["table_transactions_total"] - fixed_tx * idle["ticks"]) / idle["conversations"] / idle["hours"]
    idle_dl_hour = idle["directline_requests_per_conversation_hour"]
    rows = []
    for per_day in VOLUMES:
        conversations = per_day * DAYS_PER_MONTH
        webhooks = conversations * MESSAGES_PER_CONVERSATION
        open_conversations = per_day * OPEN_HOURS_PER_CONVERSATION / 24
        due_per_tick = open_conversations * idle_dl_hour / (3600 / tick_interval)
        tick_seconds = empty_tick + due_per_tick * per_conv_second
        executions = ticks_per_month + webhooks
        # A tick never overlaps the previous one (the timer is a singleton): at most the whole month.
        timer_billed = min(MONTH_SECONDS, ticks_per_month * billed_seconds(tick_seconds))
        gb_seconds = INSTANCE_GB * (timer_billed + webhooks * billed_seconds(hook_burst["mean_seconds"]))
        fixed_table = ticks_per_month * fixed_tx * max(1, math.ceil(due_per_tick / 1000))
        table = (fixed_table + webhooks * hook_burst["table_transactions_per_webhook"]
                 + conversations * OPEN_HOURS_PER_CONVERSATION * idle_tx_hour)
        directline = (webhooks * hook_burst["directline_requests_per_webhook"]
                      + conversations * OPEN_HOURS_PER_CONVERSATION * idle_dl_hour)
        messages = webhooks * 2
        queue = 0.0
        if chase:
            looks = webhooks * chase["looks_per_chase"]
            running = looks / MONTH_SECONDS * billed_seconds(chase["seconds_per_look"])
            gb_seconds += INSTANCE_GB * MONTH_SECONDS * busy_instances(running)
            executions += looks
            directline += webhooks * chase["directline_requests_per_chase"]
            table += webhooks * chase["table_transactions_per_chase"]
            queue = webhooks * chase["queue_transactions_per_chase"]
        usd = {
            "functions": max(0.0, gb_seconds - PRICES["flex_free_gb_seconds"]["usd"]) * PRICES["flex_gb_second"]["usd"]
            + max(0.0, executions - PRICES["flex_free_executions"]["usd"]) / 1e6
            * PRICES["flex_million_executions"]["usd"],
            "tables": table / 10_000 * PRICES["table_10k_transactions"]["usd"],
            "queues": queue / 10_000 * PRICES["queue_10k_operations"]["usd"],
            "directline_messages": messages / 1000 * PRICES["premium_channel_1k_messages"]["usd"],
        }
        rows.append({"conversations_per_day": per_day, "executions": executions, "gb_seconds": gb_seconds,
                     "timer_gb_seconds": INSTANCE_GB * timer_billed, "table_transactions": table,
                     "fixed_table_transactions": fixed_table, "queue_transactions": queue,
                     "directline_requests": directline,
                     "directline_messages": messages, "usd": usd, "usd_total": sum(usd.values())})
    return rows


def capacity_model(fanout: dict[str, Any]) -> dict[str, Any]:
    """Instances the poll needs for 10,000 and 100,000 open conversations at the default schedule, from the
    fan-out run on one host (an instance alone): per instance, as many conversations a second as its batches
    work side by side (QUEUE_CONCURRENCY batches, each at the measured wall time per conversation) or its CPU
    allows (INSTANCE_VCPUS over the measured CPU time per conversation), whichever is fewer."""
    one = min(fanout["runs"], key=lambda run: run["hosts"])
    counts = max(fanout["runs"], key=lambda run: run["hosts"])  # the counts hardly depend on the hosts
    by_wall = QUEUE_CONCURRENCY / one["batch_seconds_per_conversation"]
    by_cpu = INSTANCE_VCPUS / one["cpu_seconds_per_conversation"]
    per_instance = min(by_wall, by_cpu)
    share = EXCHANGE_SHARE / EXCHANGE_POLL_SECONDS + (1 - EXCHANGE_SHARE) / IDLE_POLL_SECONDS
    rows = []
    for conversations in CAPACITY_CONVERSATIONS:
        due = conversations * share
        rows.append({"conversations": conversations, "due_per_second": due,
                     "instances": math.ceil(due / per_instance), "cpu_seconds_per_second": due
                     * one["cpu_seconds_per_conversation"],
                     "directline_requests_per_second": due * counts["directline_requests_per_conversation"],
                     "table_transactions_per_second": due * counts["table_transactions_per_conversation"],
                     "queue_transactions_per_second": due * counts["queue_transactions_per_conversation"]})
    return {"exchange_share": EXCHANGE_SHARE, "exchange_poll_seconds": EXCHANGE_POLL_SECONDS,
            "idle_poll_seconds": IDLE_POLL_SECONDS, "instance_vcpus": INSTANCE_VCPUS,
            "queue_concurrency": QUEUE_CONCURRENCY, "per_instance_by_wall": by_wall, "per_instance_by_cpu": by_cpu,
            "per_instance": per_instance, "rows": rows}


def fanout_verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for issue 19's fan-out targets."""
    fanout = results.get("fanout")
    if not fanout:
        return []
    most = max(fanout["runs"], key=lambda run: run["hosts"])
    wanted = TARGETS["fanout_conversations"]
    met = (most["hosts"] >= TARGETS["fanout_hosts"] and most["conversations"] >= wanted
           and most["duplicates"] == 0 and most["missing"] == 0)
    largest = fanout["capacity"]["rows"][-1]
    return [
        (f"fan-out: {TARGETS['fanout_hosts']} worker hosts, {wanted:,} due conversations, no reply doubled or lost",
         f"{most['hosts']} hosts, {most['conversations']:,} conversations in {most['seconds']:.1f} s: "
         f"{most['duplicates']} duplicates, {most['missing']} missing", "0 duplicates, 0 missing", met),
        (f"capacity: instances for {largest['conversations']:,} open conversations at the default schedule",
         f"{largest['instances']:,} ({largest['due_per_second']:,.0f} due a second, "
         f"{fanout['capacity']['per_instance']:,.0f} per instance)", "shown", True),
    ]


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for each target of issue 9."""
    big = results["ticks"][-1]
    idle = results["idle"]["settled"]
    burst_prompt = next(r for r in results["latency"] if r["burst_seconds"] > 0 and r["reply"] == "prompt")
    share = burst_prompt["p50"] / burst_prompt["timer_seconds"]
    return [
        (f"{big['conversations']:,} active conversations in one tick", f"{big['relay']['seconds']:.2f} s",
         f"<= {TARGETS['tick_seconds_1000']} s", big["relay"]["seconds"] <= TARGETS["tick_seconds_1000"]),
        ("... faster than the naive poller", f"{big['speedup']:.0f}x", f">= {TARGETS['speedup_1000']:.0f}x",
         big["speedup"] >= TARGETS["speedup_1000"]),
        ("idle: Table transactions per conversation per tick",
         _with_keep_alive(f"{idle['table_transactions_per_conversation_tick']:.4f}", results["idle"]),
         f"<= {TARGETS['idle_table_transactions_per_conversation_tick']}",
         idle["table_transactions_per_conversation_tick"] <= TARGETS["idle_table_transactions_per_conversation_tick"]),
        ("idle: Direct Line requests per conversation per minute (worst minute, idle >= 5 min)",
         _with_keep_alive(f"{idle['directline_requests_per_conversation_minute_peak']:.2f}", results["idle"]),
         f"<= {TARGETS['idle_directline_requests_per_conversation_minute']:.0f}",
         idle["directline_requests_per_conversation_minute_peak"]
         <= TARGETS["idle_directline_requests_per_conversation_minute"]),
        ("reply latency p50, burst on, prompt bot", f"{burst_prompt['p50']:.2f} s ({share:.2f} of the timer)",
         f"< {TARGETS['reply_p50_share_of_timer']} of the timer", share < TARGETS["reply_p50_share_of_timer"]),
        ("cold start: import function_app (bare interpreter; app's share after azure.functions)",
         f"{results['cold_start']['import_ms']:.0f} ms; {results['cold_start']['app_import_ms']:.0f} ms",
         f"< {TARGETS['cold_start_import_ms']:.0f} ms",
         results["cold_start"]["import_ms"] < TARGETS["cold_start_import_ms"]),
    ]


def late_reply_verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for issue 19's late-reply target: the default schedule against the baseline."""
    default = next((c for c in results.get("latency_cost", []) if c["default"]), None)
    if default is None:
        return []
    late = next(r for r in default["latency"] if r["reply"].startswith("late"))
    idle, before = default["idle"], results["baseline"]["idle"]
    most = 1 + TARGETS["idle_cost_growth"]
    dl = idle["directline_requests_per_conversation_hour"]
    dl_before = before["directline_requests_per_conversation_hour"]
    tx = idle["per_conversation_table_transactions_per_hour"]
    tx_before = before["per_conversation_table_transactions_per_hour"]
    chase = f", chase {default['chase_seconds']:g} s" if default.get("chase_seconds") else ""
    where = f"default settings ({default['schedule']}, burst {default['burst_seconds']:g} s{chase})"
    return [
        (f"late (3 s) reply p50, {where}", f"{late['p50']:.2f} s", f"<= {TARGETS['late_reply_p50_seconds']:g} s",
         late["p50"] <= TARGETS["late_reply_p50_seconds"]),
        (f"late (3 s) reply p95, {where}", f"{late['p95']:.2f} s", f"<= {TARGETS['late_reply_p95_seconds']:g} s",
         late["p95"] <= TARGETS["late_reply_p95_seconds"]),
        ("idle: Direct Line requests per conversation-hour, default schedule", f"{dl:.1f} (before {dl_before:.1f})",
         f"<= {dl_before * most:.1f} (+{TARGETS['idle_cost_growth']:.0%})", dl <= dl_before * most),
        ("idle: Table transactions per conversation-hour, default schedule (the fixed cost of every tick apart: "
         f"{idle['fixed_table_transactions_per_tick']:.2f} a tick, {_fixed_per_hour(idle):,.0f} an hour, before "
         f"{_fixed_per_hour(before):,.0f})", _with_keep_alive(f"{tx:.2f} (before {tx_before:.2f})", idle),
         f"<= {tx_before * most:.2f} (+{TARGETS['idle_cost_growth']:.0%})", tx <= tx_before * most),
    ]


def _with_keep_alive(measured: str, idle: dict[str, Any]) -> str:
    """`measured`, with what issue 16's token keep-alive adds to it: the targets' baselines predate it."""
    refreshes = idle.get("token_refreshes_per_conversation_hour")
    if not refreshes:
        return measured
    return (f"{measured}, with {refreshes:.1f} token refreshes a conversation-hour (issue 16's keep-alive: each a "
            "Direct Line request, its new token taken into its row by the batch that moves the row on anyway)")


def summary(results: dict[str, Any]) -> str:
    lines = ["Benchmark summary (targets of issues 9 and 19):"]
    for target, measured, goal, met in verdicts(results) + late_reply_verdicts(results) + fanout_verdicts(results):
        lines.append(f"  [{'met' if met else 'MISSED'}] {target}: {measured} (target {goal})")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks, idle = results["ticks"], results["idle"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [t["conversations"] for t in ticks]
    positions = range(len(sizes))
    left.bar([p - 0.2 for p in positions], [t["relay"]["seconds"] for t in ticks], 0.4, label="relay poll_tick")
    left.bar([p + 0.2 for p in positions], [t["naive"]["seconds"] for t in ticks], 0.4, label="naive poller")
    left.set_yscale("log")
    left.set_xticks(list(positions), [f"{s:,}" for s in sizes])
    left.set_xlabel(f"due conversations ({ticks[0]['latency_ms']} ms Direct Line latency)")
    left.set_ylabel("wall time of one tick (s, log)")
    left.axhline(TARGETS["tick_seconds_1000"], color="grey", linestyle=":", label="target at 1,000")
    left.legend()
    left.set_title("One poll tick")
    minutes = [s["t"] / 60 for s in idle["series"]]
    tx, dl = 0.0, 0.0
    cumulative_tx, cumulative_dl = [], []
    for s in idle["series"]:
        tx += s["table_transactions"] / idle["conversations"]
        dl += s["directline_requests"] / idle["conversations"]
        cumulative_tx.append(tx)
        cumulative_dl.append(dl)
    right.plot(minutes, cumulative_dl, label="Direct Line requests")
    right.plot(minutes, cumulative_tx, label="Table transactions")
    right.plot(minutes, [m for m in minutes], color="grey", linestyle=":", label="1 request a minute")
    right.set_xlabel("minutes idle (simulated 5 s ticks)")
    right.set_ylabel("per conversation, cumulative")
    right.legend()
    right.set_title(f"Idle hour, {idle['conversations']} conversations")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latency_cost_chart(results: dict[str, Any], path: Path, *, per_day: int = 1_000) -> None:
    """Late-reply p50 and p95 of each candidate schedule against what the relay costs a month at `per_day`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    most = 0.0
    for candidate in results["latency_cost"]:
        late = next(r for r in candidate["latency"] if r["reply"].startswith("late"))
        row = next(r for r in candidate["cost"] if r["conversations_per_day"] == per_day)
        usd = row["usd"]["functions"] + row["usd"]["tables"] + row["usd"].get("queues", 0.0)
        most = max(most, usd)
        line = axes.plot([usd, usd], [late["p50"], late["p95"]], marker="o", linewidth=3, alpha=0.7,
                         label=f"{candidate['name']}{' (default)' if candidate['default'] else ''}")
        axes.annotate(f"p95 {late['p95']:.1f} s", (usd, late["p95"]), textcoords="offset points", xytext=(6, 0),
                      color=line[0].get_color(), va="center")
        axes.annotate(f"p50 {late['p50']:.1f} s", (usd, late["p50"]), textcoords="offset points", xytext=(6, 0),
                      color=line[0].get_color(), va="center")
    axes.axhline(TARGETS["late_reply_p50_seconds"], color="grey", linestyle=":", label="target p50")
    axes.axhline(TARGETS["late_reply_p95_seconds"], color="grey", linestyle="--", label="target p95")
    axes.set_xlabel(f"Functions + Tables a month at {per_day:,} conversations a day (USD; Direct Line messages, "
                    "the same for all, left out)", fontsize=8)
    axes.set_ylabel("late (3 s) reply latency, p50 to p95 (s)")
    axes.set_ylim(bottom=0)
    axes.set_xlim(0, most * 1.3)  # room for the labels
    axes.legend(fontsize=8)
    axes.set_title("Late replies: latency against cost, per timer schedule")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict[str, Any], chart_name: str) -> str:
    meta, ticks, idle = results["meta"], results["ticks"], results["idle"]
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (benchmarks/): do not edit by hand. Raw numbers: "
        "[benchmarks.json](benchmarks.json).",
        "",
        f"Run {meta['started']} on {meta['machine']} ({meta['cpus']} CPUs), Python {meta['python']}, against "
        "the local stack: Azurite, the Direct Line emulator (built-in echo bot) with "
        f"{ticks[0]['latency_ms']} ms added to every Direct Line request, the provider simulator, and the "
        "local Functions host. Table transactions are counted at the storage client's transport (one REST "
        "request, as billed: a batch or a query page is one); Direct Line requests by the emulator's counters.",
        "Everything shares one 2-core machine, so absolute times are pessimistic and vary with its load (1-minute "
        f"load average {meta.get('load_average_before', float('nan')):.1f} before the run, "
        f"{meta.get('load_average_after', float('nan')):.1f} after); the counts are exact.",
        *([f"This run measured only {', '.join(meta['sections'])}: the other sections come from an earlier run."]
          if len(meta.get("sections", SECTIONS)) < len(SECTIONS) else []),
        "",
        "## Where we stand",
        "",
        "| Target | Measured | Goal | |",
        "|---|---|---|---|",
    ]
    for target, measured, goal, met in verdicts(results) + late_reply_verdicts(results) + fanout_verdicts(results):
        out.append(f"| {target} | {measured} | {goal} | {'met' if met else '**missed**'} |")
    out += [
        "",
        f"![One poll tick, and an idle hour]({chart_name})",
        "",
        "## 1. One poll tick",
        "",
        "Every conversation is due (a user wrote 30 s ago, so a reply is likely and the schedule polls it at "
        "every tick); 2 % have a new bot reply waiting, which is delivered to the provider simulator. The relay "
        "peeks each settled conversation with the due index's copy of its watermark and only claims and works "
        "(lease, outbox, delivery, schedule) the ones with something new; a quiet row stays as it is, since it is "
        "due again at the next tick anyway (a row backing off is moved on, 100 to a transaction: 10 batches for "
        "1,000). The naive poller does the same job "
        "statelessly, one conversation after another: read the record, GET activities, deliver, write. The relay's "
        "tick is the median of several alike (each with new replies for the same 2 %): "
        + "; ".join(f"{t['conversations']:,}: " + ", ".join(f"{x:.2f}" for x in t["relay"].get("tick_seconds", []))
                    + " s" for t in ticks) + ".",
        "",
        "| Conversations | Relay tick | Conversations/s | Worked / quiet | DL requests | Table tx per conversation "
        "| Peak RSS (growth) | Naive tick | Naive DL requests | Naive tx per conversation | Speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in ticks:
        r, n = t["relay"], t["naive"]
        out.append(f"| {t['conversations']:,} | {r['seconds']:.2f} s | {r['conversations_per_second']:.0f} | "
                   f"{r['worked']} / {r['quiet']} | {r['directline_requests']:,} | "
                   f"{r['table_transactions_per_conversation']:.3f} | {r['peak_rss_mb']:.0f} MB "
                   f"(+{r['rss_growth_mb']:.1f}) | {n['seconds']:.1f} s | {n['directline_requests']:,} | "
                   f"{n['table_transactions_per_conversation']:.1f} | {t['speedup']:.0f}x |")
    big = ticks[-1]["relay"]
    out += [
        "",
        f"Table transactions of the {ticks[-1]['conversations']:,} tick by kind: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(big["table_by_kind"].items())) + ". Before this work the "
        f"same tick cost {results['before']['tick_1000']['table_transactions_per_conversation']:.2f} transactions "
        f"per conversation and took {results['before']['tick_1000']['seconds']:.1f} s (claim read + lease write, "
        "outbox query, then index insert, record write, index delete for every conversation).",
        "",
        "## 2. Idle cost",
        "",
        f"{idle['conversations']} conversations, all idle from the start (bot reply delivered), for "
        f"{idle['hours']:g} hour of simulated {idle['tick_seconds']:g} s ticks (the clock is simulated; Direct "
        "Line and Table Storage are real). Adaptive polling: every tick while a reply is likely (2 minutes), "
        f"then 5, 10, 20, 40 s up to RELAY_POLL_CEILING_SECONDS (60). A conversation that has been peeked "
        "without news for an hour is worked once under its lease (tokens, idle expiry).",
        "",
        "| | Per conversation-hour | Per conversation per tick | Idle >= 5 min: per tick | "
        "Idle >= 5 min: DL per minute (mean / worst minute) |",
        "|---|---:|---:|---:|---:|",
        f"| Table transactions | {idle['table_transactions_per_conversation_hour']:.2f} | "
        f"{idle['table_transactions_per_conversation_tick']:.4f} | "
        f"{idle['settled']['table_transactions_per_conversation_tick']:.4f} | |",
        f"| Direct Line requests | {idle['directline_requests_per_conversation_hour']:.1f} | "
        f"{idle['directline_requests_per_conversation_hour'] / (3600 / idle['tick_seconds']):.4f} | | "
        f"{idle['settled']['directline_requests_per_conversation_minute']:.2f} / "
        f"{idle['settled']['directline_requests_per_conversation_minute_peak']:.2f} |",
        "",
        "The due-index query is one transaction per tick whatever the number of conversations (up to 1,000 "
        f"rows a page), so its share per conversation falls as 1/N: here 1/{idle['conversations']}. The naive "
        "poller would spend 2 transactions and 1 Direct Line request per conversation at every tick "
        f"({2 * 3600 / idle['tick_seconds']:.0f} transactions and {3600 / idle['tick_seconds']:.0f} requests per "
        f"conversation-hour); the relay before this work spent "
        f"{results['before']['idle']['table_transactions_per_conversation_hour']:.0f} transactions per "
        "conversation-hour.",
        "",
        "## 3. Reply latency",
        "",
        "From the bot putting its reply into the conversation (the emulator's activity timestamp) to the "
        f"provider simulator receiving it, through the local host with the timer every "
        f"{results['latency'][0]['timer_seconds']} s"
        + (f" and the chase at its default (RELAY_CHASE_SECONDS={results['latency'][0]['chase_seconds']:g}: a reply "
           "the burst missed is looked for every second, section 6)" if results["latency"][0].get("chase_seconds")
           else "")
        + ". Samples start at random moments over two timer periods. "
        "A late (proactive) reply comes 3 s after the user's message, after a 2 s burst has ended.",
        "",
        "| Burst polling | Reply | Samples | p50 | p95 | max | p50 / timer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["latency"]:
        out.append(f"| {'on (' + format(r['burst_seconds'], 'g') + ' s)' if r['burst_seconds'] else 'off'} | "
                   f"{r['reply']} | {r['samples']} | {r['p50']:.2f} s | {r['p95']:.2f} s | {r['max']:.2f} s | "
                   f"{r['p50'] / r['timer_seconds']:.2f} |")
    cold, inbound, hook, hook_burst = (results["cold_start"], results["inbound"], results["webhook_cost"],
                                       results["webhook_cost_burst"])
    out += [
        "",
        "## 4. Cold start",
        "",
        f"A fresh interpreter imports `function_app` and indexes its {cold['functions']} functions "
        "(`app.get_functions()`, what the Python worker reports to the host); median of "
        f"{cold['runs']} runs: import {cold['import_ms']:.0f} ms from a bare interpreter, of which "
        f"{cold['app_import_ms']:.0f} ms once `azure.functions` is loaded (the Python worker loads it before "
        f"the app); indexing {cold['index_ms']:.1f} ms; the whole process {cold['process_ms']:.0f} ms (interpreter "
        "start included). Most of the import is azure-core, azure-data-tables and requests, which the first "
        "invocation needs anyway (deferring them would move the time, not save it). `python -X importtime -c "
        "'import function_app'` shows the breakdown.",
        "",
        "## 5. Inbound webhooks",
        "",
        f"Signed Twilio webhooks through the local host, burst polling off, {inbound['concurrency']} at a time: "
        f"**{inbound['webhooks_per_second']:.1f} webhooks/s** (p50 {inbound['p50_seconds'] * 1000:.0f} ms, p95 "
        f"{inbound['p95_seconds'] * 1000:.0f} ms). One at a time a webhook takes "
        f"{inbound['sequential_mean_seconds'] * 1000:.0f} ms with {inbound['directline_requests_per_webhook']:.2f} "
        f"Direct Line requests of {inbound['latency_ms']} ms: the relay's own time (host included) is "
        f"**{inbound['relay_own_seconds'] * 1000:.0f} ms**.",
        "",
        "In this process (no host), per webhook:",
        "",
        "| Burst polling | Time | Relay's own time | Table transactions | Direct Line requests |",
        "|---|---:|---:|---:|---:|",
    ]
    for h in (hook, hook_burst):
        out.append(f"| {'on (' + format(h['burst_seconds'], 'g') + ' s)' if h['burst_seconds'] else 'off'} | "
                   f"{h['mean_seconds'] * 1000:.0f} ms | {h['relay_own_seconds'] * 1000:.0f} ms | "
                   f"{h['table_transactions_per_webhook']:.1f} | {h['directline_requests_per_webhook']:.1f} |")
    if "latency_cost" in results:
        out += latency_cost_markdown(results)
    if "seed" in results:
        out += seed_markdown(results)
    if "fanout" in results:
        out += fanout_markdown(results)
    out += [
        "",
        "## Cost model",
        "",
        f"Assumptions: each conversation brings {MESSAGES_PER_CONVERSATION} user messages (webhooks, burst "
        f"polling on) and as many bot replies, then stays open {OPEN_HOURS_PER_CONVERSATION} h until the idle "
        f"timeout ends it, costing what the idle hour measured; the timer runs every {idle['tick_seconds']:g} s "
        f"({MONTH_SECONDS / idle['tick_seconds']:,.0f} executions a month), each tick lasting the measured empty "
        f"tick plus the measured time per due conversation; instances have {INSTANCE_GB:g} GB and each execution "
        f"is billed as an active period of its own, at least {MIN_BILLABLE_SECONDS:g} s and rounded up to "
        f"{BILLING_STEP_SECONDS:g} s as Flex Consumption bills (executions that overlap on one instance share one "
        "period in reality, so this is an upper bound; a timer every second keeps an instance billed all month). "
        f"Months have {DAYS_PER_MONTH} days."
        + (" With the default settings every user message is chased too (section 6 says how a chase is billed)."
           if any(c["default"] and c.get("chase") for c in results.get("latency_cost", [])) else "")
        + (" Section 6 gives the same model for each candidate, the default included." if "latency_cost" in
           results else ""),
        "",
        "| Conversations a day | Executions | GB-s | Table transactions | Direct Line requests | Direct Line "
        "messages | Functions | Tables (and queues) | Direct Line | Total a month |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["cost"]:
        usd = row["usd"]
        out.append(f"| {row['conversations_per_day']:,} | {row['executions']:,.0f} | {row['gb_seconds']:,.0f} | "
                   f"{row['table_transactions']:,.0f} | {row['directline_requests']:,.0f} | "
                   f"{row['directline_messages']:,.0f} | ${usd['functions']:,.2f} | "
                   f"${usd['tables'] + usd.get('queues', 0.0):,.2f} | "
                   f"${usd['directline_messages']:,.2f} | ${row['usd_total']:,.2f} |")
    out += ["", "Prices used (USD, pay-as-you-go):", ""]
    for name, price in PRICES.items():
        amount = f"${price['usd']:.6f}".rstrip("0").rstrip(".") if price["usd"] < 1000 else f"{price['usd']:,}"
        out.append(f"- `{name}`: {amount} per {price['unit']} ({price['source']}).")
    out += [
        "",
        "Direct Line bills messages (activities to and from the bot) on premium channels, not polling requests; "
        "the requests column is there because Direct Line throttles them. Storage capacity, bandwidth, Key "
        "Vault and Application Insights are left out.",
        "",
    ]
    return "\n".join(out)




def _fixed_per_hour(idle: dict[str, Any]) -> float:
    """Table transactions an hour of ticks costs with nothing due."""
    return idle["fixed_table_transactions_per_tick"] * 3600 / idle["tick_seconds"]


def _reply(candidate: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(r for r in candidate["latency"] if r["reply"].startswith(kind))


def latency_cost_markdown(results: dict[str, Any]) -> list[str]:
    """Section 6: each candidate timer schedule's late-reply latency, idle cost and monthly cost, side by side."""
    rows, baseline = results["latency_cost"], results["baseline"]
    first = rows[0]["idle"]
    before = baseline["idle"]
    out = [
        "",
        "## 6. Late replies: latency against cost",
        "",
        "The bot answers 3 s after the user's message (the emulator's echo bot answers \"later\" with \"Late reply: "
        "later\" 3 s after the turn). For each timer schedule (RELAY_POLL_SCHEDULE), without and with the chase "
        "(RELAY_CHASE_SECONDS; every other setting at its "
        f"default, burst {rows[0]['burst_seconds']:g} s): reply latency through the local host as in section 3 "
        f"({_reply(rows[0], 'late')['samples']} samples each), and {first['conversations']} conversations idle "
        f"for {first['hours']:g} simulated hour(s) of ticks at the schedule's interval, as in section 2. The "
        "idle cost is split in two: what a tick costs with nothing due, whatever the number of conversations "
        "(the due-index query, and the Web Chat sessions' refresh-index query: two queries, a fixed cost per "
        "tick, the mean over the ticks with nothing due), and what each conversation adds on top (its peeks, and "
        "the index rows they postpone). Monthly costs as in the cost model below, with the schedule's own ticks. "
        f"The baseline is the 5 s timer before issue 19 (run of {baseline['run']}).",
        "",
        "| Candidate | Late p50 | Late p95 | Prompt p50 | Idle DL requests per conversation-hour | Idle table tx "
        "per conversation-hour (the conversation's) | Fixed: table tx per tick (per hour) | Executions a month "
        "| A month at 100 / 1,000 / 10,000 conversations a day | of which Functions (at 1,000) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| baseline: `*/5 * * * * *` before issue 19 | {baseline['late']['p50']:.2f} s | "
        f"{baseline['late']['p95']:.2f} s | {baseline['prompt']['p50']:.2f} s | "
        f"{before['directline_requests_per_conversation_hour']:.1f} | "
        f"{before['per_conversation_table_transactions_per_hour']:.2f} | "
        f"{before['fixed_table_transactions_per_tick']:.2f} ({_fixed_per_hour(before):,.0f}) | | | |",
    ]
    for candidate in rows:
        late, prompt, idle = _reply(candidate, "late"), _reply(candidate, "prompt"), candidate["idle"]
        cost = {row["conversations_per_day"]: row for row in candidate["cost"]}
        totals = " / ".join(f"${cost[v]['usd_total']:,.0f}" for v in VOLUMES)
        name = f"**{candidate['name']} (default)**" if candidate["default"] else candidate["name"]
        chase = f", chase {candidate['chase_seconds']:g} s" if candidate.get("chase_seconds") else ""
        out.append(
            f"| {name}: `{candidate['schedule']}`{chase} | {late['p50']:.2f} s | {late['p95']:.2f} s | "
            f"{prompt['p50']:.2f} s | "
            f"{idle['directline_requests_per_conversation_hour']:.1f} | "
            f"{idle['per_conversation_table_transactions_per_hour']:.2f} | "
            f"{idle['fixed_table_transactions_per_tick']:.2f} ({_fixed_per_hour(idle):,.0f}) | "
            f"{cost[VOLUMES[0]]['executions']:,.0f} to {cost[VOLUMES[-1]]['executions']:,.0f} | {totals} | "
            f"${cost[1_000]['usd']['functions']:,.2f} |")
    out += _chase_markdown(rows)
    out += [
        "",
        f"![Late-reply latency against monthly cost]({LATENCY_COST_CHART})",
        "",
        "Issue 19's target (see Where we stand): with the default settings, late replies at p50 <= "
        f"{TARGETS['late_reply_p50_seconds']:g} s and p95 <= {TARGETS['late_reply_p95_seconds']:g} s, while "
        f"the idle cost per conversation-hour stays within {TARGETS['idle_cost_growth']:.0%} of the baseline's. "
        "Direct Line messages (the same for every schedule) dominate the totals; what the schedule changes is "
        f"the Functions bill: a timer execution is billed at least {MIN_BILLABLE_SECONDS:g} s of a "
        f"{INSTANCE_GB:g} GB instance however short the tick, so a timer every second keeps an instance billed "
        f"all month ({INSTANCE_GB * MONTH_SECONDS:,.0f} GB-s, "
        f"${INSTANCE_GB * MONTH_SECONDS * PRICES['flex_gb_second']['usd']:,.0f} before the free grant) at any "
        "traffic, and a timer every n seconds 1/n of that. The fixed table transactions grow the same way (so "
        "many a tick), but at Table Storage's price they stay cents a month. The baseline predates the token "
        "keep-alive (issue 16: an open conversation's token is refreshed at about half its life however long "
        "it idles, four times an hour with 30-minute tokens; ../shared/reference/directline.md asks for it), "
        "so every candidate's idle figures carry those refreshes and the hourly full poll under the lease, which "
        "the baseline's did not. A refresh is made at the conversation's last peek before its token wants it and "
        "costs no transaction of its own: the new token goes into the conversation's due row alone, in the batch "
        "that moves the quiet rows on anyway, and the record takes it from the row with its next lease (the "
        "hourly full poll, or the user's next message, which reads the row once more). Kept in the record "
        "instead, each refresh would cost at least a read and a conditional write, eight transactions per "
        "conversation-hour.",
    ]
    return out


def _chase_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """What the chase candidate costs per message, and why its idle hour is the 5 s timer's."""
    out = []
    for candidate in rows:
        chase = candidate.get("chase")
        if not chase:
            continue
        prompt, late = chase["by_reply"]["prompt"], chase["by_reply"]["late"]
        out += [
            "",
            f"The chase ({candidate['name']}): every webhook with a new message leaves a chase queue message, and "
            f"the chase function looks for the bot's replies every second until {chase['chase_seconds']:g} s after "
            "the message (RELAY_CHASE_SECONDS), ending once the bot answered and was quiet for 5 s; one look per "
            "execution, each leaving the next on the queue a second later. The timer-only rows run with "
            "RELAY_CHASE_SECONDS=0. Measured through the local host with the timer out of the way (every chase "
            "execution is a look, every GET after the webhook answered is the chase's), "
            f"{prompt['messages']} messages of each kind: a message the bot answers at once (the burst delivers "
            f"the reply) is chased for {prompt['looks_per_chase']:.1f} looks of {prompt['mean_seconds'] * 1000:.0f} ms "
            f"(max {prompt['max_seconds'] * 1000:.0f} ms) and {prompt['directline_requests_per_chase']:.1f} GETs; one "
            f"it answers again 3 s later for {late['looks_per_chase']:.1f} looks of "
            f"{late['mean_seconds'] * 1000:.0f} ms (max {late['max_seconds'] * 1000:.0f} ms) and "
            f"{late['directline_requests_per_chase']:.1f} GETs. The cost model charges every message the kind with "
            f"more looks ({chase['looks_per_chase']:.1f} looks, {chase['directline_requests_per_chase']:.1f} GETs: "
            f"an upper bound), each look an execution, a record read and 3 queue transactions (put, get, delete). "
            "Looks overlap, so they are billed as the instances they keep busy: messages arrive at random and an "
            f"instance works {QUEUE_CONCURRENCY} at once (host.json batchSize + newBatchThreshold). "
            "While nobody writes there is no chase: the idle cost is the "
            f"{candidate.get('idle_shared_with', 'same schedule')}'s, the same run.",
        ]
    return out


def seed_markdown(results: dict[str, Any]) -> list[str]:
    """Section 7: the sample's thread-per-conversation polling beside the relay."""
    seeds = results["seed"]
    default = next((c for c in results.get("latency_cost", []) if c["default"]), None)
    minute = (default or results)["idle"]["settled"]["directline_requests_per_conversation_minute"]
    settled = minute * 60
    out = [
        "",
        "## 7. The seed's design beside ours",
        "",
        "Microsoft's custom channel sample (Dynamics365-Apps-Samples, bring-your-own-channel: what this project "
        "started from) keeps every active conversation in memory with a thread that GETs its activities from the "
        "last watermark, hands the bot's to the channel, then waits `PollingIntervalInMilliseconds` (2,000 in the "
        "sample's settings), forever until the bot ends the conversation. benchmarks/seed.py does the same "
        f"against the emulator ({seeds[0]['latency_ms']} ms added to every request, as for the relay). "
        f"{seeds[0]['conversations']} users each write \"hello\" (which starts the conversation and its thread), "
        "then \"later\" at a random moment of the thread's polling; reply latency is "
        "from the bot's activity timestamp to the conversation's thread seeing it (the relay's, to the provider "
        "simulator receiving it: a few milliseconds more). Direct Line requests are the GETs the emulator counted "
        f"on those conversations over {seeds[0]['window_seconds']:.0f} s, scaled to a conversation-hour: the "
        "sample polls at that rate whether anything happens or not, hour after hour, where the relay's idle "
        "conversations back off (the relay's column is its first idle hour, from section 6; idle 5 minutes or "
        f"more, {settled:.0f} an hour) and end after RELAY_IDLE_TIMEOUT_MINUTES.",
        "",
        "| Design | Polls every | Direct Line requests per conversation-hour | Prompt reply p50 / p95 | Late (3 s) "
        "reply p50 / p95 | State |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in seeds:
        out.append(f"| the sample: a thread per conversation | {s['interval_seconds']:g} s after each GET | "
                   f"{s['directline_requests_per_conversation_hour']:,.0f} | {s['prompt']['p50']:.2f} / "
                   f"{s['prompt']['p95']:.2f} s | {s['late']['p50']:.2f} / {s['late']['p95']:.2f} s | "
                   "in one process's memory: lost on restart, one instance |")
    for candidate in results.get("latency_cost", []):
        prompt, late = _reply(candidate, "prompt"), _reply(candidate, "late")
        name = f"the relay, {candidate['name']}{' (default)' if candidate['default'] else ''}"
        out.append(f"| {name} | adaptive, timer every {candidate['timer_seconds']:g} s | "
                   f"{candidate['idle']['directline_requests_per_conversation_hour']:,.0f} | {prompt['p50']:.2f} / "
                   f"{prompt['p95']:.2f} s | {late['p50']:.2f} / {late['p95']:.2f} s | Table Storage: survives "
                   "restarts, any number of instances |")
    return out


def fanout_markdown(results: dict[str, Any]) -> list[str]:
    """Section 8: the poll fanned out over the queue on 1, 2 and 4 hosts, and the capacity model."""
    fanout, capacity = results["fanout"], results["fanout"]["capacity"]
    runs = fanout["runs"]
    out = [
        "",
        "## 8. Fan-out over the poll queue",
        "",
        f"{fanout['conversations']:,} conversations are due at once ({fanout['reply_share']:.0%} with a bot reply "
        "waiting; the others idle at the ceiling, so one worked is not due again during the run). N local hosts "
        "(devstack.host on function_app) share Azurite and the emulator "
        f"({fanout['latency_ms']} ms added to every Direct Line request): the first runs the timer "
        f"(`{fanout['schedule']}`), which hands the due rows to the poll queue in batches of 100 (more than "
        f"RELAY_FANOUT_THRESHOLD={fanout['fanout_threshold']} are due); the others have "
        "AzureWebJobs.poller.Disabled and work batches only (poll_batch, up to "
        f"{QUEUE_CONCURRENCY} at once per host). Time: from the batches appearing in the queue until no row "
        "due at the start is due any more and every waiting reply was delivered. Every reply was delivered exactly "
        "once (the provider simulator's records; the run fails otherwise). A conversation whose work failed (here: "
        "Azurite timing out under the load) stays due and is worked by a later round. A run longer than the ceiling "
        "sees conversations fall due again: the figures per conversation are over every conversation peeked or "
        "worked (the log lines of batches and ticks). CPU: each host process's user + "
        "system time over the run (/proc), idle polling of the queue included. Storage transactions are counted "
        "in the hosts at the storage client's transport, as elsewhere. All hosts share this 2-core machine with "
        "Azurite and the emulator, so more hosts add no cores: the runs show the work spreads and stays "
        "exactly once, not how fast separate instances would be.",
        "",
        "| Hosts | Time | Conversations/s | Ticks | poll_batch executions per host | Batch: median time "
        "(conversations) | CPU per conversation | DL requests per conversation | Table tx per conversation "
        "| Queue tx per "
        "conversation | Delivered / duplicates / missing | Failed attempts (worked again) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in runs:
        batch = (f"{run['batch_seconds_median']:.2f} s ({run['batch_conversations_median']:.0f})"
                 if run["batch_seconds_median"] is not None else "")
        out.append(f"| {run['hosts']} | {run['seconds']:.1f} s | {run['conversations_per_second']:.0f} | "
                   f"{run['ticks']} | {' + '.join(str(n) for n in run['poll_batch_executions_per_host'])} | {batch} | "
                   f"{run['cpu_seconds_per_conversation'] * 1000:.1f} ms | "
                   f"{run['directline_requests_per_conversation']:.2f} | "
                   f"{run['table_transactions_per_conversation']:.3f} | "
                   f"{run['queue_transactions_per_conversation']:.3f} | {run['delivered']} / {run['duplicates']} / "
                   f"{run['missing']} | {run.get('failed_attempts', 0)} |")
    out += [
        "",
        f"![Fan-out on 1, 2 and 4 hosts]({FANOUT_CHART})",
        "",
        "### Capacity model",
        "",
        f"Open conversations are polled on their own schedule: assume {capacity['exchange_share']:.0%} are in an "
        f"exchange (a message within the last 2 minutes: polled every {capacity['exchange_poll_seconds']:g} s) "
        f"and the rest idle at the ceiling (every {capacity['idle_poll_seconds']:g} s, RELAY_POLL_CEILING_SECONDS): "
        "assumptions, not measurements. One instance works "
        f"{capacity['queue_concurrency']} batches at once (host.json batchSize + newBatchThreshold), so at the "
        "measured wall time per conversation in a batch (one host) it works "
        f"{capacity['per_instance_by_wall']:,.0f} conversations a second; its CPU (assumption: "
        f"{capacity['instance_vcpus']:g} vCPU for 2,048 MB, not confirmed) allows "
        f"{capacity['per_instance_by_cpu']:,.0f} at the measured CPU time per conversation. The lower, "
        f"**{capacity['per_instance']:,.0f} conversations a second per instance**, gives the instances the poll "
        "needs (webhooks and chases scale on their own, apart):",
        "",
        "| Open conversations | Due a second | Instances | CPU seconds a second | Direct Line requests a second "
        "| Table tx a second | Queue tx a second |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in capacity["rows"]:
        out.append(f"| {row['conversations']:,} | {row['due_per_second']:,.0f} | {row['instances']:,} | "
                   f"{row['cpu_seconds_per_second']:,.1f} | {row['directline_requests_per_second']:,.0f} | "
                   f"{row['table_transactions_per_second']:,.0f} | {row['queue_transactions_per_second']:,.1f} |")
    out += [
        "",
        "Beyond instances: the due index is one table partition, which Azure Table Storage targets at about "
        "2,000 entities a second (its scalability targets), and every due conversation's row is read by a batch "
        "query and rewritten when it is postponed; Direct Line's own rate limits apply to the GETs. Either may "
        "bound the poll before the instances do.",
    ]
    return out


def fanout_chart(results: dict[str, Any], path: Path) -> None:
    """Time and CPU per conversation on 1, 2 and 4 hosts; instances against open conversations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fanout = results["fanout"]
    runs, capacity = fanout["runs"], fanout["capacity"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    hosts = [str(run["hosts"]) for run in runs]
    left.bar(hosts, [run["seconds"] for run in runs], color="tab:blue", label="time to work them all (s)")
    left.set_xlabel(f"worker hosts ({fanout['conversations']:,} due conversations, one 2-core machine)")
    left.set_ylabel("seconds")
    cpu = left.twinx()
    cpu.plot(hosts, [run["cpu_seconds_per_conversation"] * 1000 for run in runs], color="tab:red", marker="o",
             label="CPU per conversation (ms)")
    cpu.set_ylabel("CPU ms per conversation")
    cpu.set_ylim(bottom=0)
    left.legend(loc="upper left", fontsize=8)
    cpu.legend(loc="upper right", fontsize=8)
    left.set_title("Fan-out: time and CPU")
    open_conversations = [1_000, 3_000, 10_000, 30_000, 100_000, 300_000]
    share = (capacity["exchange_share"] / capacity["exchange_poll_seconds"]
             + (1 - capacity["exchange_share"]) / capacity["idle_poll_seconds"])
    right.plot(open_conversations, [math.ceil(n * share / capacity["per_instance"]) for n in open_conversations],
               marker="o")
    for row in capacity["rows"]:
        right.annotate(f"{row['instances']} at {row['conversations']:,}", (row["conversations"], row["instances"]),
                       textcoords="offset points", xytext=(-10, 8), fontsize=8, ha="right")
    right.set_xscale("log")
    right.set_xlabel(f"open conversations ({capacity['exchange_share']:.0%} in an exchange)")
    right.set_ylabel("instances the poll needs")
    right.set_ylim(bottom=0)
    right.set_title(f"Capacity: {capacity['per_instance']:,.0f} conversations/s per instance")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
