"""docs/benchmarks.md, its chart and the printed summary, from the results JSON; and the cost model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TARGETS = {
    "tick_seconds_1000": 2.5,
    "speedup_1000": 20.0,
    "idle_table_transactions_per_conversation_tick": 0.02,
    "idle_directline_requests_per_conversation_minute": 1.0,
    "reply_p50_share_of_timer": 0.3,
    "cold_start_import_ms": 400.0,
}

# Published list prices (USD, pay-as-you-go, East US). Checked 2025 (see `source`): where a figure
# could not be confirmed against Microsoft's own pricing page it is marked an assumption.
PRICES: dict[str, dict[str, Any]] = {
    "flex_gb_second": {"usd": 0.000026, "unit": "GB-s of on-demand execution",
                       "source": "Flex Consumption on-demand rate, modal.com Azure Functions pricing guide "
                                 "(22 May 2025); not confirmed on azure.microsoft.com from here"},
    "flex_million_executions": {"usd": 0.40, "unit": "million on-demand executions",
                                "source": "assumption: Functions pricing page as remembered (2025), not confirmed"},
    "flex_free_gb_seconds": {"usd": 100_000, "unit": "GB-s free per month (on demand)",
                             "source": "assumption: as remembered (2025), not confirmed"},
    "flex_free_executions": {"usd": 250_000, "unit": "executions free per month (on demand)",
                             "source": "assumption: as remembered (2025), not confirmed"},
    "table_10k_transactions": {"usd": 0.00036, "unit": "10,000 Table transactions (Standard, LRS)",
                               "source": "assumption: Table Storage pricing page as remembered (2025), not confirmed"},
    "premium_channel_1k_messages": {"usd": 0.50, "unit": "1,000 Direct Line (premium channel) messages, S1",
                                    "source": "assumption: Bot Service pricing as remembered (2025), not "
                                              "confirmed; polling GETs are not messages"},
}
INSTANCE_GB = 2.0  # Flex Consumption's default instance memory (2,048 MB)
MESSAGES_PER_CONVERSATION = 10  # user messages a day's conversation brings (and as many bot replies)
OPEN_HOURS_PER_CONVERSATION = 24  # idle until RELAY_IDLE_TIMEOUT_MINUTES (1440) ends it
TICKS_PER_MONTH = 30 * 86_400 / 5  # RELAY_POLL_SCHEDULE every 5 s
DAYS_PER_MONTH = 30


def cost_model(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Monthly usage and cost for 100, 1,000 and 10,000 conversations a day, from the measured counts."""
    idle, ticks = results["idle"], results["ticks"]
    hook_burst = results["webhook_cost_burst"]
    per_conv_second = ticks[-1]["relay"]["seconds"] / ticks[-1]["conversations"]
    empty_tick = idle["empty_tick_seconds"]
    # The idle hour's transactions less its one due-index query per tick: what each conversation adds.
    idle_tx_hour = (idle["table_transactions_total"] - idle["ticks"]) / idle["conversations"] / idle["hours"]
    idle_dl_hour = idle["directline_requests_per_conversation_hour"]
    rows = []
    for per_day in (100, 1_000, 10_000):
        conversations = per_day * DAYS_PER_MONTH
        webhooks = conversations * MESSAGES_PER_CONVERSATION
        open_conversations = per_day * OPEN_HOURS_PER_CONVERSATION / 24
        due_per_tick = open_conversations * idle_dl_hour / (3600 / 5)
        tick_seconds = empty_tick + due_per_tick * per_conv_second
        executions = TICKS_PER_MONTH + webhooks
        gb_seconds = INSTANCE_GB * (TICKS_PER_MONTH * tick_seconds + webhooks * hook_burst["mean_seconds"])
        table = (TICKS_PER_MONTH * max(1, math.ceil(due_per_tick / 1000))
                 + webhooks * hook_burst["table_transactions_per_webhook"]
                 + conversations * OPEN_HOURS_PER_CONVERSATION * idle_tx_hour)
        directline = (webhooks * hook_burst["directline_requests_per_webhook"]
                      + conversations * OPEN_HOURS_PER_CONVERSATION * idle_dl_hour)
        messages = webhooks * 2
        usd = {
            "functions": max(0.0, gb_seconds - PRICES["flex_free_gb_seconds"]["usd"]) * PRICES["flex_gb_second"]["usd"]
            + max(0.0, executions - PRICES["flex_free_executions"]["usd"]) / 1e6
            * PRICES["flex_million_executions"]["usd"],
            "tables": table / 10_000 * PRICES["table_10k_transactions"]["usd"],
            "directline_messages": messages / 1000 * PRICES["premium_channel_1k_messages"]["usd"],
        }
        rows.append({"conversations_per_day": per_day, "executions": executions, "gb_seconds": gb_seconds,
                     "table_transactions": table, "directline_requests": directline,
                     "directline_messages": messages, "usd": usd, "usd_total": sum(usd.values())})
    return rows


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for each target of issue 9."""
    big = results["ticks"][-1]
    idle = results["idle"]["settled"]
    burst_prompt = next(r for r in results["latency"] if r["burst_seconds"] > 0 and r["reply"] == "prompt")
    share = burst_prompt["p50"] / burst_prompt["timer_seconds"]
    return [
        (f"{big['conversations']:,} active conversations in one tick", f"{big['relay']['seconds']:.2f} s",
         f"< {TARGETS['tick_seconds_1000']} s", big["relay"]["seconds"] < TARGETS["tick_seconds_1000"]),
        ("... faster than the naive poller", f"{big['speedup']:.0f}x", f">= {TARGETS['speedup_1000']:.0f}x",
         big["speedup"] >= TARGETS["speedup_1000"]),
        ("idle: Table transactions per conversation per tick",
         f"{idle['table_transactions_per_conversation_tick']:.4f}",
         f"<= {TARGETS['idle_table_transactions_per_conversation_tick']}",
         idle["table_transactions_per_conversation_tick"] <= TARGETS["idle_table_transactions_per_conversation_tick"]),
        ("idle: Direct Line requests per conversation per minute (worst minute, idle >= 5 min)",
         f"{idle['directline_requests_per_conversation_minute_peak']:.2f}",
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


def summary(results: dict[str, Any]) -> str:
    lines = ["Benchmark summary (targets of issue 9):"]
    for target, measured, goal, met in verdicts(results):
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
        "",
        "## Where we stand",
        "",
        "| Target | Measured | Goal | |",
        "|---|---|---|---|",
    ]
    for target, measured, goal, met in verdicts(results):
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
        "(lease, outbox, delivery, schedule) the ones with something new. The naive poller does the same job "
        "statelessly, one conversation after another: read the record, GET activities, deliver, write.",
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
        f"{results['latency'][0]['timer_seconds']} s. Samples start at random moments over two timer periods. "
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
    out += [
        "",
        "## Cost model",
        "",
        f"Assumptions: each conversation brings {MESSAGES_PER_CONVERSATION} user messages (webhooks, burst "
        f"polling on) and as many bot replies, then stays open {OPEN_HOURS_PER_CONVERSATION} h until the idle "
        "timeout ends it, costing what the idle hour measured; the timer runs every 5 s "
        f"({TICKS_PER_MONTH:,.0f} executions a month), each tick lasting the measured empty tick plus the "
        "measured time per due conversation; instances have 2 GB and are billed for the measured wall time of "
        "each execution (executions that overlap on one instance are billed once in reality, so this is an upper "
        "bound). Months have 30 days.",
        "",
        "| Conversations a day | Executions | GB-s | Table transactions | Direct Line requests | Direct Line "
        "messages | Functions | Tables | Direct Line | Total a month |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["cost"]:
        usd = row["usd"]
        out.append(f"| {row['conversations_per_day']:,} | {row['executions']:,.0f} | {row['gb_seconds']:,.0f} | "
                   f"{row['table_transactions']:,.0f} | {row['directline_requests']:,.0f} | "
                   f"{row['directline_messages']:,.0f} | ${usd['functions']:,.2f} | ${usd['tables']:,.2f} | "
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
