"""The local host's queue trigger and disabled functions, against Azurite's queue service."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy, QueueClient

from devstack.procs import Azurite, ManagedProcess, wait_until
from devstack.queues import (
    PollingBackoff,
    QueueFunction,
    QueueListener,
    QueuesOptions,
    parse_timespan,
    poison_queue_name,
    queue_service,
    validate_queue_name,
)

APP = Path(__file__).parent / "apps" / "queue_app.py"
NEVER = "0 0 0 1 1 *"


def queue_client(azurite: Azurite, name: str, *, base64: bool = True) -> QueueClient:
    """A client that writes and reads bodies base64-encoded as the Functions host expects, or the text as it is."""
    if base64:
        return QueueClient.from_connection_string(azurite.connection_string, name,
                                                  message_encode_policy=BinaryBase64EncodePolicy(),
                                                  message_decode_policy=BinaryBase64DecodePolicy())
    return QueueClient.from_connection_string(azurite.connection_string, name)


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stored(queue: QueueClient) -> int:
    """Messages in the queue, visible or not (0 once every one is deleted)."""
    return queue.get_queue_properties().approximate_message_count


def poisoned(queue: QueueClient) -> list:
    """The poison queue's messages; none while it does not exist."""
    try:
        return queue.peek_messages(max_messages=32)
    except ResourceNotFoundError:
        return []


class QueueHosts:
    """Hosts running tests/apps/queue_app.py on queues of this test's own (`work` on .queue, `other` on .other)."""

    def __init__(self, start_host: Callable[..., ManagedProcess], azurite: Azurite, tmp_path: Path):
        self.start_host, self.azurite, self.tmp_path = start_host, azurite, tmp_path
        suffix = uuid.uuid4().hex[:10]
        self.queue_name, self.other_name = f"work-{suffix}", f"other-{suffix}"
        self.queue = queue_client(azurite, self.queue_name)
        self.raw_queue = queue_client(azurite, self.queue_name, base64=False)
        self.poison = queue_client(azurite, f"{self.queue_name}-poison")
        self.raw_poison = queue_client(azurite, f"{self.queue_name}-poison", base64=False)
        self.other = queue_client(azurite, self.other_name)

    def start(self, *, label: str = "a", env: dict[str, str] | None = None, **queues) -> tuple[ManagedProcess, Path]:
        """Start a host with host.json extensions.queues = `queues`: the process and its records file."""
        host_json = self.tmp_path / f"host-{label}.json"
        host_json.write_text(json.dumps({"version": "2.0", "extensions": {"queues": queues}}))
        record_file = self.tmp_path / f"records-{label}.jsonl"
        host = self.start_host(script=APP, host_json=host_json, env={
            "AzureWebJobsStorage": self.azurite.connection_string,
            "QUEUE_APP_QUEUE": self.queue_name, "QUEUE_APP_OTHER_QUEUE": self.other_name,
            "QUEUE_APP_RECORDS": str(record_file), "QUEUE_APP_LABEL": label, "QUEUE_APP_BEAT": NEVER,
            **(env or {}),
        })
        return host, record_file


@pytest.fixture
def hosts(start_host, azurite, tmp_path) -> QueueHosts:
    return QueueHosts(start_host, azurite, tmp_path)


FAST = {"maxPollingInterval": "00:00:00.5"}


def test_a_message_is_delivered_once_with_its_decoded_body_and_metadata_and_then_deleted(hosts):
    hosts.queue.create_queue()
    body = "héllo ✓".encode() + b"\x00\xff"
    sent = hosts.queue.send_message(body)
    _, record_file = hosts.start(**FAST)
    wait_until(lambda: records(record_file) and stored(hosts.queue) == 0, timeout=30, what="delivery and delete")
    [delivery] = records(record_file)
    assert (delivery["function"], bytes.fromhex(delivery["body"]), delivery["id"]) == ("work", body, sent.id)
    assert delivery["dequeue_count"] == 1
    assert delivery["inserted"] and delivery["expires"] and delivery["pop_receipt"]


def test_a_failing_message_is_retried_then_moved_with_its_content_to_the_poison_queue(hosts):
    hosts.queue.create_queue()
    hosts.queue.send_message(b"fail, always")
    host, record_file = hosts.start(maxDequeueCount=3, **FAST)
    wait_until(lambda: poisoned(hosts.poison) and stored(hosts.queue) == 0, timeout=30, what="the poison queue")
    assert [d["dequeue_count"] for d in records(record_file)] == [1, 2, 3]
    assert [m.content for m in poisoned(hosts.poison)] == [b"fail, always"]
    log = host.log_path.read_text()
    assert "Message has reached MaxDequeueCount of 3" in log
    assert "Executed 'Functions.work' (Failed" in log and "DequeueCount=3" in log


def test_visibility_timeout_delays_each_retry(hosts):
    hosts.queue.create_queue()
    hosts.queue.send_message(b"fail")
    _, record_file = hosts.start(maxDequeueCount=2, visibilityTimeout="00:00:02", maxPollingInterval="00:00:00.2")
    wait_until(lambda: poisoned(hosts.poison), timeout=30, what="the poison queue")
    first, second = records(record_file)
    assert second["start"] - first["end"] >= 1.9


def test_message_encoding_none_hands_the_text_over_as_it_is(hosts):
    hosts.raw_queue.create_queue()
    for text in ("plain ✓ text", "aGVsbG8="):  # the second would be b"hello" under base64
        hosts.raw_queue.send_message(text)
    _, record_file = hosts.start(messageEncoding="none", **FAST)
    wait_until(lambda: len(records(record_file)) == 2, timeout=30, what="two deliveries")
    assert sorted(bytes.fromhex(d["body"]).decode() for d in records(record_file)) == ["aGVsbG8=", "plain ✓ text"]


def test_a_message_that_is_not_base64_goes_to_the_poison_queue_unrun(hosts):
    hosts.raw_queue.create_queue()
    hosts.raw_queue.send_message("not base64!")
    hosts.queue.send_message(b"fine")
    host, record_file = hosts.start(**FAST)
    wait_until(lambda: records(record_file) and poisoned(hosts.raw_poison), timeout=30, what="delivery and poison")
    assert [bytes.fromhex(d["body"]) for d in records(record_file)] == [b"fine"]
    assert [m.content for m in poisoned(hosts.raw_poison)] == ["not base64!"]
    assert "Message decoding has failed! Check MessageEncoding settings" in host.log_path.read_text()


def test_a_message_dequeued_too_often_already_goes_to_the_poison_queue_unrun(hosts):
    """As when the instances that held it died: the host moves it without running the function."""
    hosts.queue.create_queue()
    hosts.queue.send_message(b"crashes its host")
    for _ in range(2):
        [message] = hosts.queue.receive_messages(visibility_timeout=30)
        hosts.queue.update_message(message.id, message.pop_receipt, visibility_timeout=0)
    _, record_file = hosts.start(maxDequeueCount=2, **FAST)
    wait_until(lambda: poisoned(hosts.poison) and stored(hosts.queue) == 0, timeout=30, what="the poison queue")
    assert records(record_file) == []


def test_two_hosts_on_one_queue_run_each_message_exactly_once(hosts):
    hosts.queue.create_queue()
    settings = {"batchSize": 4, "newBatchThreshold": 2, **FAST}
    _, file_a = hosts.start(label="a", **settings)
    _, file_b = hosts.start(label="b", **settings)
    expected = [f"sleep:0.05:{n}" for n in range(40)]
    for text in expected:
        hosts.queue.send_message(text.encode())
    wait_until(lambda: len(records(file_a)) + len(records(file_b)) >= 40 and stored(hosts.queue) == 0,
               timeout=60, what="forty deliveries")
    deliveries = records(file_a) + records(file_b)
    assert sorted(bytes.fromhex(d["body"]).decode() for d in deliveries) == sorted(expected)
    assert {d["host"] for d in deliveries} == {"a", "b"}


def test_a_queue_created_after_the_host_started_is_picked_up(hosts):
    host, record_file = hosts.start(**FAST)
    wait_until(lambda: f"work: queueTrigger {hosts.queue_name}" in host.log_path.read_text(), timeout=10,
               what="the listener")
    hosts.queue.create_queue()
    hosts.queue.send_message(b"late")
    wait_until(lambda: records(record_file), timeout=30, what="the delivery")
    assert host.returncode is None


def test_a_disabled_function_of_any_trigger_does_not_run(hosts):
    hosts.queue.create_queue()
    hosts.other.create_queue()
    hosts.other.send_message(b"for the disabled function")
    hosts.queue.send_message(b"for the enabled one")
    host, record_file = hosts.start(env={"QUEUE_APP_BEAT": "* * * * * *", "AzureWebJobs.other.Disabled": "true",
                                         "AzureWebJobs.beat_too.Disabled": "1", "azurewebjobs.PONG.disabled": "True"},
                                    **FAST)
    # Both listeners would fetch at once and both timers tick together: by the time the enabled ones have run,
    # the disabled ones would have too.
    wait_until(lambda: sum(d["function"] == "beat" for d in records(record_file)) >= 3
               and any(d["function"] == "work" for d in records(record_file)), timeout=30, what="the enabled ones")
    assert {d["function"] for d in records(record_file)} == {"beat", "work"}
    assert [m.dequeue_count for m in hosts.other.peek_messages()] == [0]
    assert requests.get(f"{host.url}/api/ping", timeout=10).status_code == 200
    assert requests.get(f"{host.url}/api/pong", timeout=10).status_code == 404


def test_stopping_lets_a_running_invocation_finish_and_complete(hosts):
    hosts.queue.create_queue()
    hosts.queue.send_message(b"sleep:1.5")
    host, record_file = hosts.start(**FAST)
    # Fetched is not yet running: a message fetched as the host stops goes back to the queue.
    wait_until(lambda: "Executing 'Functions.work'" in host.log_path.read_text(), timeout=30, what="the invocation")
    host.stop()
    assert host.returncode == 0
    assert len(records(record_file)) == 1
    assert stored(hosts.queue) == 0


def test_a_host_json_queues_setting_out_of_range_stops_the_host_with_its_name(hosts):
    with pytest.raises(RuntimeError, match=r"extensions\.queues\.maxPollingInterval: '2000' is not a duration"):
        hosts.start(maxPollingInterval="2000")


def test_an_unresolved_queue_name_or_connection_skips_only_that_function(hosts):
    host, _ = hosts.start(env={"QUEUE_APP_OTHER_QUEUE": "Not_A_Queue", "AzureWebJobsStorage": ""}, **FAST)
    wait_until(lambda: "function other is not listening: queue name 'not_a_queue' is invalid"
               in host.log_path.read_text(), timeout=10, what="the queue name's error")
    wait_until(lambda: "function work is not listening: connection 'AzureWebJobsStorage': set the app setting"
               in host.log_path.read_text(), timeout=10, what="the connection's error")
    assert requests.get(f"{host.url}/api/ping", timeout=10).text == "pong"


def test_polling_backs_off_exponentially_up_to_the_maximum_and_a_found_message_resets_it():
    backoff = PollingBackoff(1.0, uniform=lambda low, high: 1.0)
    delays = [backoff.next_delay(found_message=False) for _ in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.3, 0.5, 0.9, 1.0, 1.0])
    assert backoff.next_delay(found_message=True) == pytest.approx(0.1)
    assert backoff.next_delay(found_message=False) == pytest.approx(0.2)
    jittered = PollingBackoff(60.0, uniform=lambda low, high: low)
    assert [jittered.next_delay(found_message=False) for _ in range(3)] == pytest.approx([0.1, 0.18, 0.26])


def test_host_json_queues_settings_have_the_hosts_defaults():
    consumption = {"WEBSITE_SKU": "Dynamic"}
    assert QueuesOptions.from_host_json({}, consumption) == QueuesOptions(
        batch_size=16, new_batch_threshold=8, max_polling_interval=60.0, visibility_timeout=0.0,
        max_dequeue_count=5, message_encoding="base64")
    assert QueuesOptions.from_host_json({"BatchSize": "4"}, consumption).new_batch_threshold == 2
    assert QueuesOptions.from_host_json({"batchSize": 4}, {}).new_batch_threshold == 2 * (os.cpu_count() or 1)
    assert QueuesOptions.from_host_json({}, {"AZURE_FUNCTIONS_ENVIRONMENT": "Development"}).max_polling_interval == 2.0
    options = QueuesOptions.from_host_json({"visibilityTimeout": "00:00:05", "maxPollingInterval": "00:00:02",
                                            "messageEncoding": "None", "maxDequeueCount": 2}, consumption)
    assert (options.visibility_timeout, options.max_polling_interval, options.message_encoding,
            options.max_dequeue_count) == (5.0, 2.0, "none", 2)


@pytest.mark.parametrize(("section", "complaint"), [
    ({"batchSize": 33}, "batchSize: 33 is not a whole number 1 to 32"),
    ({"maxDequeueCount": 0}, "maxDequeueCount: 0 is not a whole number 1 or more"),
    ({"newBatchThreshold": -1}, "newBatchThreshold: -1"),
    ({"maxPollingInterval": 2000}, "maxPollingInterval: 2000 is not a duration"),
    ({"maxPollingInterval": "00:00:00.05"}, "maxPollingInterval must not be less than"),
    ({"visibilityTimeout": "00:75:00"}, "visibilityTimeout: '00:75:00' has hours above 23"),
    ({"messageEncoding": "utf8"}, "messageEncoding: 'utf8' is neither"),
])
def test_a_host_json_queues_setting_out_of_range_is_named(section, complaint):
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(")):
        QueuesOptions.from_host_json(section, {})


def test_durations_are_read_as_dotnet_timespans():
    assert parse_timespan("00:00:02", setting="s") == 2.0
    assert parse_timespan("00:01", setting="s") == 60.0
    assert parse_timespan("1.02:03:04.5", setting="s") == 93784.5


def test_queue_names_are_lower_cased_checked_and_given_a_poison_queue_when_the_host_would():
    assert validate_queue_name("Relay-Poll") == "relay-poll"
    for bad in ("a--b", "-ab", "ab", "a" * 64, "a_b"):
        with pytest.raises(ValueError, match="is invalid"):
            validate_queue_name(bad)
    assert poison_queue_name("relay-poll") == "relay-poll-poison"
    assert poison_queue_name("relay-poll-poison") is None
    assert poison_queue_name("a" * 57) is None


def test_a_connection_is_a_connection_string_or_an_identity_based_service_uri(azurite):
    assert queue_service("AzureWebJobsStorage", {"AzureWebJobsStorage": azurite.connection_string}).url.startswith(
        f"http://127.0.0.1:{azurite.queue_port}/")
    identity = queue_service("AzureWebJobsStorage",
                             {"AzureWebJobsStorage__queueServiceUri": "https://acct.queue.core.windows.net"})
    assert identity.url.startswith("https://acct.queue.core.windows.net")
    assert queue_service("Storage", {"azurewebjobsstorage__accountname": "acct"}).url.startswith(
        "https://acct.queue.core.windows.net")
    with pytest.raises(ValueError, match="app setting Secret is not a storage connection string") as error:
        queue_service("Secret", {"Secret": "AccountKey=hunter2"})
    assert "hunter2" not in str(error.value)
    with pytest.raises(ValueError, match="set the app setting Missing"):
        queue_service("Missing", {})


def test_messages_a_fetch_brings_as_the_host_stops_go_back_to_the_queue_unrun(azurite):
    """A fetch under way when the host stops: its messages are visible again at once, not after the lease."""
    fetching, stopped = threading.Event(), threading.Event()

    class StoppedMidFetch(QueueClient):
        def receive_messages(self, **options):
            fetching.set()
            stopped.wait(10)
            return super().receive_messages(**options)

    name = f"midfetch-{uuid.uuid4().hex[:10]}"
    queue = queue_client(azurite, name)
    queue.create_queue()
    queue.send_message(b"not now")
    calls = []
    listener = QueueListener(
        QueueFunction(name="work", trigger_arg="message", queue_name=name, connection="", user_function=None),
        queue=StoppedMidFetch.from_connection_string(azurite.connection_string, name), poison_queue=None,
        options=QueuesOptions(max_polling_interval=0.5), call=lambda message, invocation_id: calls.append(message))
    runner = threading.Thread(target=listener.run)
    runner.start()
    assert fetching.wait(10)
    listener.stop()
    stopped.set()
    runner.join(10)
    assert listener.drain(10) == 0
    assert calls == []
    assert [m.dequeue_count for m in queue.peek_messages()] == [1]  # fetched once, visible again


def test_what_an_http_function_sets_on_its_queue_output_is_written_to_the_queue_and_triggers_it(hosts):
    host, record_file = hosts.start(**FAST)  # the queue does not exist yet: the output binding creates it
    answer = requests.post(f"{host.url}/api/enqueue", data="first\nsecond ✓".encode(), timeout=10)
    assert answer.status_code == 202
    wait_until(lambda: len(records(record_file)) == 2, timeout=30, what="both messages run")
    assert sorted(bytes.fromhex(r["body"]).decode() for r in records(record_file)) == ["first", "second ✓"]
    assert requests.post(f"{host.url}/api/enqueue", data=b"", timeout=10).status_code == 202  # nothing set: none
    wait_until(lambda: stored(hosts.queue) == 0, timeout=30, what="the queue drained")
    assert len(records(record_file)) == 2


def test_an_http_function_whose_queue_output_does_not_resolve_is_left_out_and_the_others_run(hosts):
    """As the real host fails to index it: not run, its work done, and only then failed (500) at every request."""
    host, _ = hosts.start(env={"QUEUE_APP_QUEUE": "Not_A_Queue"}, **FAST)
    wait_until(lambda: "function enqueue is in error and not loaded: queue name 'not_a_queue' is invalid"
               in host.log_path.read_text(), timeout=10, what="the output's error")
    assert requests.post(f"{host.url}/api/enqueue", data=b"first", timeout=10).status_code == 404
    assert requests.get(f"{host.url}/api/ping", timeout=10).text == "pong"
