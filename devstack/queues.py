"""The queue trigger as the Functions host runs it, for the local host (devstack/host.py).

It does what Microsoft.Azure.WebJobs.Extensions.Storage.Queues 5.x does (its QueueListener,
QueueProcessor, QueuesOptions and RandomizedExponentialBackoffStrategy, in Azure/azure-sdk-for-net
sdk/storage/Microsoft.Azure.WebJobs.Extensions.Storage.Common/src/Shared/Queues/), as documented in
"Azure Queue storage trigger for Azure Functions" (sections Poison messages, Polling algorithm,
Concurrency) and the host.json reference for `extensions.queues`:

- Polling. Each function has a listener that fetches up to batchSize messages at once and runs
  each on a thread of its own; it fetches again as soon as no more than newBatchThreshold are
  still running, so at most batchSize + newBatchThreshold run at once. A fetch that finds nothing
  (or a queue that does not exist yet, or a storage error) waits a random exponential back-off,
  100 ms + 0.8-1.2 x 2^(n-1) x 100 ms after the n-th empty fetch, at most maxPollingInterval; a
  fetch that finds a message resets it.
- Lease. A message is fetched invisible for 10 minutes, as the real host fetches it. The real host
  renews that lease at half-time while the function runs; this host does not: host.json's
  functionTimeout (5 minutes) ends any invocation in Azure well before, and an invocation that
  outlives the lease here is logged (another instance may have run the message meanwhile).
- Completion. Success deletes the message. Failure (an exception) makes it visible again after
  visibilityTimeout, or, once its dequeue count has reached maxDequeueCount, copies its content
  to `<queue>-poison` (created when needed) and deletes it. A message dequeued more than
  maxDequeueCount times already (the instances holding it died) goes there unrun, and so does
  one whose body is not valid base64 under messageEncoding "base64" (warning "Message decoding
  has failed! Check MessageEncoding settings."). A queue named `*-poison`, or one whose poison
  queue name would exceed 63 characters, has none: a message that fails there stays invisible
  until its lease ends, as the real host leaves it.
- The trigger argument is an azure.functions QueueMessage: the body decoded per messageEncoding,
  id, dequeue_count, insertion_time, expiration_time, time_next_visible and pop_receipt.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import random
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as TriggerMessage
from azure.storage.queue import QueueClient, QueueMessage, QueueServiceClient

__all__ = [
    "LEASE_SECONDS",
    "MessageEncoding",
    "PollingBackoff",
    "QueueFunction",
    "QueueListener",
    "QueuesOptions",
    "parse_timespan",
    "poison_queue_name",
    "queue_service",
    "validate_queue_name",
]

log = logging.getLogger("devstack.host")

LEASE_SECONDS = 600
"""How long a fetched message stays invisible to other instances (the real host's 10 minutes)."""

MAX_BATCH_SIZE = 32
"""The queue service returns at most 32 messages a request."""

_POISON_SUFFIX = "-poison"
_QUEUE_NAME = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")
_TIMESPAN = re.compile(r"(?:(\d+)\.)?(\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.(\d{1,7}))?)?")


class MessageEncoding(StrEnum):
    """host.json extensions.queues.messageEncoding: how a message's text holds its body."""

    BASE64 = "base64"
    NONE = "none"


@dataclass(frozen=True)
class QueueFunction:
    name: str
    trigger_arg: str
    queue_name: str
    """As declared: may hold %SETTING% expressions."""
    connection: str
    """The name of the app setting (or setting prefix) that locates the storage account."""
    user_function: Any


def parse_timespan(text: str, *, setting: str) -> float:
    """Seconds in a .NET TimeSpan written `[d.]hh:mm[:ss[.fffffff]]`, as host.json writes durations.

    ValueError naming `setting` otherwise: a bare number would be days to the real host."""
    match = _TIMESPAN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"host.json {setting}: {text!r} is not a duration \"hh:mm:ss\" (as \"00:00:02\")")
    days, hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes) > 59 or int(seconds or 0) > 59:
        raise ValueError(f"host.json {setting}: {text!r} has hours above 23 or minutes or seconds above 59")
    return (int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
            + float(f"0.{fraction or 0}"))


@dataclass(frozen=True)
class QueuesOptions:
    """host.json `extensions.queues`, with the real host's defaults and limits."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: MessageEncoding = MessageEncoding.BASE64

    @classmethod
    def from_host_json(cls, section: Mapping[str, Any],
                       environ: Mapping[str, str] | os._Environ = os.environ) -> QueuesOptions:
        """Bind the section as the host does: keys case-insensitive; ValueError naming a value out of range.

        Defaults: newBatchThreshold is batchSize/2 per processor (one processor on the Consumption
        plan, WEBSITE_SKU "Dynamic"); maxPollingInterval is a minute, two seconds in the Development
        environment (AZURE_FUNCTIONS_ENVIRONMENT, which Core Tools sets)."""
        values = {key.lower(): value for key, value in section.items()}
        batch_size = _integer(values, "batchSize", 16, minimum=1, maximum=MAX_BATCH_SIZE)
        processors = 1 if environ.get("WEBSITE_SKU", "").lower() == "dynamic" else (os.cpu_count() or 1)
        development = environ.get("AZURE_FUNCTIONS_ENVIRONMENT", "").lower() == "development"
        max_polling_interval = _duration(values, "maxPollingInterval", 2.0 if development else 60.0)
        if max_polling_interval < PollingBackoff.MINIMUM:
            raise ValueError("host.json extensions.queues.maxPollingInterval must not be less than 00:00:00.1")
        encoding = str(values.get("messageencoding", "base64")).lower()
        if encoding not in set(MessageEncoding):
            raise ValueError(f"host.json extensions.queues.messageEncoding: {encoding!r} is neither "
                             "\"base64\" nor \"none\"")
        return cls(
            batch_size=batch_size,
            new_batch_threshold=_integer(values, "newBatchThreshold", batch_size // 2 * processors, minimum=0),
            max_polling_interval=max_polling_interval,
            visibility_timeout=_duration(values, "visibilityTimeout", 0.0),
            max_dequeue_count=_integer(values, "maxDequeueCount", 5, minimum=1),
            message_encoding=MessageEncoding(encoding),
        )


def _duration(values: Mapping[str, Any], name: str, default: float) -> float:
    if name.lower() not in values:
        return default
    return parse_timespan(values[name.lower()], setting=f"extensions.queues.{name}")


def _integer(values: Mapping[str, Any], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    value = values.get(name.lower(), default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum and value > maximum):
        bounds = f"{minimum} to {maximum}" if maximum else f"{minimum} or more"
        raise ValueError(f"host.json extensions.queues.{name}: {value!r} is not a whole number {bounds}")
    return value


class PollingBackoff:
    """The real host's RandomizedExponentialBackoffStrategy(100 ms, maxPollingInterval): the wait after a fetch."""

    MINIMUM = 0.1
    RANDOMIZATION = 0.2

    def __init__(self, maximum: float, *, uniform: Callable[[float, float], float] = random.uniform):
        self.maximum = maximum
        self._uniform = uniform
        self._current = 0.0
        self._exponent = 0

    def next_delay(self, *, found_message: bool) -> float:
        """Seconds to wait before the next fetch; `found_message`: a fetch found one since the last wait."""
        if found_message:
            self._current, self._exponent = self.MINIMUM, 1
        elif self._current != self.maximum:
            interval = self.MINIMUM
            if self._exponent > 0:
                factor = self._uniform(1 - self.RANDOMIZATION, 1 + self.RANDOMIZATION)
                interval += factor * 2 ** (self._exponent - 1) * self.MINIMUM
            if interval < self.maximum:
                self._current, self._exponent = interval, self._exponent + 1
            else:
                self._current = self.maximum
        return self._current


def validate_queue_name(name: str) -> str:
    """The name lower-cased, as the host coerces it; ValueError when the queue service would refuse it."""
    name = name.lower()
    if not _QUEUE_NAME.fullmatch(name):
        raise ValueError(f"queue name {name!r} is invalid: 3-63 lower-case letters, digits and single hyphens, "
                         "starting and ending with a letter or digit")
    return name


def poison_queue_name(queue_name: str) -> str | None:
    """`<queue>-poison`, or None where the host keeps no poison queue (a poison queue, or a name too long)."""
    if queue_name.endswith(_POISON_SUFFIX) or len(queue_name + _POISON_SUFFIX) > 63:
        return None
    return queue_name + _POISON_SUFFIX


def queue_service(connection: str, environ: Mapping[str, str] | os._Environ = os.environ) -> QueueServiceClient:
    """The queue service an app setting names, found as the host finds it (`AzureWebJobs<name>`, then `<name>`):
    a connection string, or identity-based `<name>__queueServiceUri` (or `__serviceUri`, `__accountName`) with
    DefaultAzureCredential (`<name>__clientId` for a user-assigned identity).

    ValueError, naming the settings but never their values, when neither is set or the value is malformed."""
    settings = {key.lower(): value for key, value in environ.items()}
    name = connection or "AzureWebJobsStorage"
    for candidate in (f"AzureWebJobs{name}", name):
        prefix = candidate.lower()
        if settings.get(prefix):
            try:
                return QueueServiceClient.from_connection_string(settings[prefix])
            except ValueError:
                raise ValueError(f"app setting {candidate} is not a storage connection string") from None
        uri = settings.get(f"{prefix}__queueserviceuri") or settings.get(f"{prefix}__serviceuri")
        account = settings.get(f"{prefix}__accountname")
        if not uri and account:
            uri = f"https://{account}.queue.core.windows.net"
        if uri:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential(managed_identity_client_id=settings.get(f"{prefix}__clientid") or None)
            return QueueServiceClient(uri, credential=credential)
    raise ValueError(f"connection {name!r}: set the app setting {name} (a connection string) or "
                     f"{name}__queueServiceUri (identity-based)")


@contextlib.contextmanager
def _unless_gone(function: str, action: str, message: QueueMessage) -> Iterator[None]:
    """Let a message that another instance took over (pop receipt mismatch) or that vanished go, as the host does."""
    try:
        yield
    except ResourceNotFoundError:
        log.debug("function %s: cannot %s message %s: the message or its queue is gone", function, action, message.id)
    except HttpResponseError as error:
        code = getattr(error, "error_code", None)  # the storage SDK sets it on its errors
        if code not in ("PopReceiptMismatch", "QueueBeingDeleted", "QueueDisabled"):
            raise
        log.debug("function %s: cannot %s message %s (%s)", function, action, message.id, code)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


class QueueListener:
    """One queue function's listener: fetch, invoke, complete, as the module docstring describes.

    `call(message, invocation_id)` runs the function; run() polls until stop() (its own thread)."""

    def __init__(self, function: QueueFunction, *, queue: QueueClient, poison_queue: QueueClient | None,
                 options: QueuesOptions, call: Callable[[TriggerMessage, str], object],
                 uniform: Callable[[float, float], float] = random.uniform):
        self.function = function
        self.queue = queue
        self.poison_queue = poison_queue
        self.options = options
        self._call = call
        self._backoff = PollingBackoff(options.max_polling_interval, uniform=uniform)
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._running = 0

    def run(self) -> None:
        found_since_wait = False
        while not self._stopping.is_set():
            messages = self._fetch()
            if not messages:
                if self._stopping.wait(self._backoff.next_delay(found_message=found_since_wait)):
                    return
                found_since_wait = False
                continue
            found_since_wait = True
            for message in messages:
                self._start(message)
            with self._changed:
                self._changed.wait_for(lambda: self._running <= self.options.new_batch_threshold
                                       or self._stopping.is_set())

    def stop(self) -> None:
        """Fetch no more: run() returns once a fetch under way has ended, and what it brought is released, not run.

        Invocations already running go on: see drain()."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for running invocations to finish; how many still run."""
        with self._changed:
            self._changed.wait_for(lambda: self._running == 0, timeout=timeout)
            return self._running

    def _fetch(self) -> list[QueueMessage]:
        try:
            pages = self.queue.receive_messages(messages_per_page=self.options.batch_size,
                                                visibility_timeout=LEASE_SECONDS).by_page()
            return list(next(pages, []))
        except ResourceNotFoundError:
            return []  # the queue does not exist yet: empty, as the host treats it
        except AzureError as error:
            log.warning("function %s: cannot read queue %s (%s); trying again after a back-off",
                        self.function.name, self.queue.queue_name, _first_line(error))
            return []

    def _start(self, message: QueueMessage) -> None:
        with self._changed:
            self._running += 1
        threading.Thread(target=self._process, args=(message,), daemon=True,
                         name=f"queue:{self.function.name}:{message.id}").start()

    def _process(self, message: QueueMessage) -> None:
        try:
            self._handle(message)
        except AzureError as error:
            log.error("function %s: message %s could not be completed (%s); it is seen again after its lease",
                      self.function.name, message.id, _first_line(error))
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def _handle(self, message: QueueMessage) -> None:
        if self._stopping.is_set():  # fetched as the host stopped: back to the queue for the other instances
            self._release(message, visibility_timeout=0)
            return
        body = self._decode(message.content or "")
        dequeue_count = message.dequeue_count or 0
        if body is None:
            self._to_poison(message, "Message decoding has failed! Check MessageEncoding settings")
            return
        if dequeue_count > self.options.max_dequeue_count:
            self._to_poison(message, f"Message has reached MaxDequeueCount of {self.options.max_dequeue_count}")
            return
        trigger = TriggerMessage(
            id=message.id, body=body, dequeue_count=dequeue_count, expiration_time=message.expires_on,
            insertion_time=message.inserted_on, time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        invocation_id, started = str(uuid.uuid4()), time.monotonic()
        log.info("Executing 'Functions.%s' (Reason='New queue message detected on '%s'.', Id=%s)",
                 self.function.name, self.queue.queue_name, invocation_id)
        try:
            self._call(trigger, invocation_id)
        except Exception:
            log.error("Executed 'Functions.%s' (Failed, Id=%s, MessageId=%s, DequeueCount=%d, Duration=%dms)\n%s",
                      self.function.name, invocation_id, message.id, dequeue_count,
                      (time.monotonic() - started) * 1000, traceback.format_exc())
            succeeded = False
        else:
            log.info("Executed 'Functions.%s' (Succeeded, Id=%s, MessageId=%s, DequeueCount=%d, Duration=%dms)",
                     self.function.name, invocation_id, message.id, dequeue_count,
                     (time.monotonic() - started) * 1000)
            succeeded = True
        if time.monotonic() - started > LEASE_SECONDS:
            log.warning("function %s: message %s ran longer than its %d s lease: another instance may have run it too",
                        self.function.name, message.id, LEASE_SECONDS)
        if succeeded:
            self._delete(message)
        elif self.poison_queue is None:
            pass  # no poison queue: the message stays invisible until its lease ends, as the host leaves it
        elif dequeue_count >= self.options.max_dequeue_count:
            self._to_poison(message, f"Message has reached MaxDequeueCount of {self.options.max_dequeue_count}")
        else:
            self._release(message, visibility_timeout=int(self.options.visibility_timeout))

    def _release(self, message: QueueMessage, *, visibility_timeout: int) -> None:
        """Make the message visible again after `visibility_timeout` seconds."""
        with _unless_gone(self.function.name, "release", message):
            self.queue.update_message(message.id, message.pop_receipt, visibility_timeout=visibility_timeout)

    def _decode(self, text: str) -> bytes | None:
        if self.options.message_encoding is MessageEncoding.NONE:
            return text.encode("utf-8")
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except binascii.Error:
            return None

    def _to_poison(self, message: QueueMessage, reason: str) -> None:
        """Copy the message's content, as stored, to the poison queue (created when needed), then delete it."""
        if self.poison_queue is None:
            log.warning("function %s: %s. Queue '%s' has no poison queue: message %s stays invisible until its "
                        "lease ends.", self.function.name, reason, self.queue.queue_name, message.id)
            return
        log.warning("function %s: %s. Moving message %s to queue '%s'.", self.function.name, reason, message.id,
                    self.poison_queue.queue_name)
        try:
            self.poison_queue.send_message(message.content)
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                self.poison_queue.create_queue()
            self.poison_queue.send_message(message.content)
        self._delete(message)

    def _delete(self, message: QueueMessage) -> None:
        with _unless_gone(self.function.name, "delete", message):
            self.queue.delete_message(message.id, message.pop_receipt)
