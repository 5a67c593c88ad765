"""Publishing with pipelined publisher confirms over pika's SelectConnection.

pika's BlockingChannel waits for each confirm before sending the next message, a round trip
(and, for a quorum queue, a replicated write) per job: a few hundred jobs per second. Here
every message of a batch is sent, then all confirms are awaited together, driving the
connection's I/O loop in the caller's thread until they are in or a timeout passes.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import pika
import pika.spec

from .errors import DroverError

#: The TLS query parameters of a broker URL, named as RabbitMQ's URI specification names them
#: and as ``drover`` reads them (docs/security.md): pika does not know them.
TLS_PARAMS = ("cacertfile", "certfile", "keyfile")

#: How long a batch waits for its confirms (the broker withholds them during an alarm).
CONFIRM_TIMEOUT = 60.0
#: How long connecting (TCP, AMQP handshake, channel, confirm mode) may take.
CONNECT_TIMEOUT = 10.0


class ConfirmPublisher:
    """One connection and one channel in confirm mode, used from one thread."""

    def __init__(self, url: str, shown: str) -> None:
        self._shown = shown
        self._error: str | None = None
        self._channel: Any = None
        self._ready = False
        self._pending: set[int] = set()
        self._next_tag = 1
        self._nacked = 0
        self._returned: list[str] = []
        params = url_parameters(url)
        self._conn = pika.SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
        )
        self._run(CONNECT_TIMEOUT, lambda: self._ready or self._error is not None)
        if not self._ready:
            self._conn.ioloop.close()
            raise DroverError(
                f"cannot connect to RabbitMQ at {shown}: "
                f"{self._error or f'no answer within {CONNECT_TIMEOUT:g} s'}"
            )

    # -- callbacks ----------------------------------------------------------------------

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, _conn: Any, err: BaseException | str) -> None:
        self._error = str(err) or type(err).__name__
        self._conn.ioloop.stop()

    def _on_close(self, _conn: Any, reason: BaseException) -> None:
        if self._error is None:
            self._error = f"connection closed: {reason}"
        self._conn.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_close)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_ok)

    def _on_channel_close(self, _channel: Any, reason: BaseException) -> None:
        if self._error is None:
            self._error = f"channel closed: {reason}"
        self._conn.ioloop.stop()

    def _on_confirm_ok(self, _frame: Any) -> None:
        self._ready = True
        self._conn.ioloop.stop()

    def _on_return(self, _ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        self._returned.append(f"{method.routing_key}: {method.reply_text}")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = (
            {t for t in self._pending if t <= method.delivery_tag}
            if method.multiple
            else {method.delivery_tag}
        )
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked += len(tags & self._pending)
        self._pending -= tags
        if not self._pending:
            self._conn.ioloop.stop()

    # -- driving ------------------------------------------------------------------------

    def _run(self, timeout: float, done: Any) -> None:
        if done():
            return
        timer = self._conn.ioloop.call_later(timeout, self._conn.ioloop.stop)
        self._conn.ioloop.start()
        self._conn.ioloop.remove_timeout(timer)

    @property
    def is_open(self) -> bool:
        """Whether the connection and channel can still publish."""
        return (
            self._error is None
            and self._channel is not None
            and self._channel.is_open
            and self._conn.is_open
        )

    def publish(self, routing_key: str, messages: Sequence[tuple[str, bytes]], now: int) -> None:
        """Publishes ``(message_id, body)`` pairs persistently to the default exchange and
        returns once the broker confirmed every one; raises :class:`DroverError` otherwise."""
        if not self.is_open:
            raise DroverError(f"RabbitMQ at {self._shown}: {self._error or 'channel closed'}")
        self._nacked = 0
        self._returned = []
        for message_id, body in messages:
            props = pika.BasicProperties(
                delivery_mode=2,
                content_type="application/json",
                message_id=message_id,
                timestamp=now,
            )
            self._channel.basic_publish("", routing_key, body, props, mandatory=True)
            self._pending.add(self._next_tag)
            self._next_tag += 1
        self._run(CONFIRM_TIMEOUT, lambda: not self._pending)
        if self._error is not None:
            raise DroverError(f"RabbitMQ at {self._shown}: {self._error}")
        if self._pending:
            lost = len(self._pending)
            self._pending.clear()
            raise DroverError(
                f"RabbitMQ at {self._shown}: {lost} of {len(messages)} messages not confirmed "
                f"within {CONFIRM_TIMEOUT:g} s (a memory or disk alarm?)"
            )
        if self._returned:
            raise DroverError(
                f"RabbitMQ at {self._shown}: {len(self._returned)} message(s) unroutable "
                f"({self._returned[0]}): queue {routing_key} does not exist; start a "
                "`drover worker` with this namespace once (it declares the queues)"
            )
        if self._nacked:
            raise DroverError(
                f"RabbitMQ at {self._shown}: {self._nacked} of {len(messages)} messages nacked"
            )

    def close(self) -> None:
        """Closes the channel and connection cleanly (reply 200)."""
        if self._conn.is_open:
            self._conn.close()
            self._run(CONNECT_TIMEOUT, lambda: self._conn.is_closed)
        self._conn.ioloop.close()


def url_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for a broker URL as ``drover`` takes it: ``cacertfile=PATH`` (PEM CAs
    trusted in addition to the system's), ``certfile=PATH`` and ``keyfile=PATH`` (a client
    certificate) on an ``amqps://`` URL become pika's SSL context; the server's name is
    checked. The parameters on an ``amqp://`` URL, a missing file or a certificate without
    its key are errors naming the parameter (and the path), never the password."""
    scheme, _, rest = url.partition("://")
    base, _, query = rest.partition("?")
    kept: list[str] = []
    tls: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name in TLS_PARAMS:
            if not value:
                raise DroverError(f"{name}: expects a file path")
            tls[name] = unquote(value)
        else:
            kept.append(pair)
    if not tls:
        return pika.URLParameters(url)
    if scheme.lower() != "amqps":
        raise DroverError(
            f"{'/'.join(sorted(tls))}: need an amqps:// URL (TLS); this one is {scheme}://"
        )
    if ("certfile" in tls) != ("keyfile" in tls):
        raise DroverError("certfile and keyfile: give both (a client certificate and its key)")
    context = ssl.create_default_context()
    for name in ("cacertfile", "certfile"):
        path = tls.get(name)
        if path is None:
            continue
        try:
            if name == "cacertfile":
                context.load_verify_locations(cafile=path)
            else:
                context.load_cert_chain(path, tls["keyfile"])
        except (OSError, ssl.SSLError) as e:
            raise DroverError(f"{name} {path}: {e}") from e
    params = pika.URLParameters(f"{scheme}://{base}" + (f"?{'&'.join(kept)}" if kept else ""))
    params.ssl_options = pika.SSLOptions(context)
    return params
