"""offload.testing without uWSGI: the frame builder byte by byte, the websocket client against
a one-connection wsproto server in a thread, wait_for, and how LiveServer finds a project."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

import offload.testing
from offload.testing import (
    ConnectionClosed,
    HandshakeError,
    HttpSession,
    LiveServer,
    RawFrame,
    WebSocketClient,
    default_project_dir,
    frame,
    tcp_connections,
    timeout_factor,
    wait_for,
)

KEY = b"\x01\x02\x03\x04"


def xor(data: bytes, key: bytes = KEY) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


# -- frame ---------------------------------------------------------------------------


def test_frame_is_built_byte_by_byte():
    assert frame(1, b"hi", mask=KEY) == b"\x81\x82" + KEY + xor(b"hi")
    assert frame(2, b"hi", mask=False) == b"\x82\x02hi"
    assert frame(0, b"", fin=False, mask=False) == b"\x00\x00"
    assert frame(9, b"p", mask=False, rsv=5) == b"\xd9\x01p"
    assert frame(2, b"x" * 126, mask=False) == b"\x82\x7e\x00\x7e" + b"x" * 126
    assert frame(2, b"x" * 65536, mask=False)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)


def test_frame_can_lie_about_its_length_and_use_non_minimal_encodings():
    assert frame(1, b"abc", mask=False, length=10) == b"\x81\x0aabc"
    assert frame(1, b"abc", mask=False, length_bits=16) == b"\x81\x7e\x00\x03abc"
    assert frame(1, b"abc", mask=False, length_bits=64) == b"\x81\x7f" + struct.pack("!Q", 3) + b"abc"
    # a length that does not fit the asked encoding goes on 64 bits
    assert frame(1, b"a" * 200, mask=False, length_bits=7)[:10] == b"\x81\x7f" + struct.pack("!Q", 200)
    assert frame(1, b"a" * 70000, mask=False, length_bits=16)[:10] == b"\x81\x7f" + struct.pack("!Q", 70000)


def test_frame_masks_with_a_random_key_unless_given_one():
    one, two = frame(1, b"same"), frame(1, b"same")
    assert one[:2] == two[:2] == b"\x81\x84"
    assert xor(one[6:], one[2:6]) == xor(two[6:], two[2:6]) == b"same"
    with pytest.raises(ValueError, match="4 bytes"):
        frame(1, b"x", mask=b"\x00")


def test_frames_parse_in_wsproto_as_a_server_sees_them():
    server = Connection(ConnectionType.SERVER)
    server.receive_data(frame(1, "hé".encode()[:2], fin=False) + frame(0, "hé".encode()[2:]) + frame(9, b"p"))
    events = list(server.events())
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == "hé"
    assert events[-1] == Ping(b"p")
    strict = Connection(ConnectionType.SERVER)
    strict.receive_data(frame(1, b"hi", mask=False))
    assert [type(e) for e in strict.events()] == [CloseConnection]


# -- a websocket server to talk to ----------------------------------------------------------


class Peer:
    """A one-connection websocket server on wsproto in a thread: handshake, then ``script(self)``."""

    def __init__(self, script=None, *, reject: int | None = None, subprotocol: str | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws/path?channel=a"
        self.script = script or (lambda peer: peer.events_until_close())
        self.reject = reject
        self.subprotocol = subprotocol
        self.request: Request | None = None
        self.received: list = []
        self.error: BaseException | None = None
        self.ws = WSConnection(ConnectionType.SERVER)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sock, _ = self.listener.accept()
            self.sock.settimeout(5)
            while self.request is None:
                self.ws.receive_data(self.sock.recv(4096))
                self.request = next((e for e in self.ws.events() if isinstance(e, Request)), None)
            if self.reject:
                head = RejectConnection(status_code=self.reject, headers=[(b"content-length", b"9")], has_body=True)
                self.sock.sendall(self.ws.send(head) + self.ws.send(RejectData(b"forbidden")))
                self.sock.close()
                return
            self.sock.sendall(self.ws.send(AcceptConnection(subprotocol=self.subprotocol)))
            self.script(self)
        except BaseException as exc:
            self.error = exc

    def send(self, event) -> None:
        self.sock.sendall(self.ws.send(event))

    def next_event(self):
        while True:
            for event in self.ws.events():
                self.received.append(event)
                return event
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)

    def events_until_close(self) -> None:
        """Echo messages, answer pings and the close, like a polite server."""
        while True:
            event = self.next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                self.send(type(event)(data=event.data))
            elif isinstance(event, Ping):
                self.send(event.response())
            elif isinstance(event, CloseConnection):
                if event.code != 1006:
                    self.send(event.response())
                self.sock.close()
                return

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.request.extra_headers if k.lower() == name), None)

    def join(self) -> None:
        self.thread.join(10)
        self.listener.close()
        if self.error is not None:
            raise self.error


def test_handshake_sends_origin_cookie_and_headers_and_takes_the_subprotocol():
    peer = Peer(subprotocol="offload.v1")
    ws = WebSocketClient(peer.url, cookie="sessionid=abc", headers={"X-Test": "1"}, subprotocols=["offload.v1"])
    assert (ws.status, ws.subprotocol) == (101, "offload.v1")
    assert peer.request.target == "/ws/path?channel=a"
    assert peer.request.subprotocols == ["offload.v1"]
    host = peer.url.split("/")[2]
    assert peer.request.host == host
    assert peer.header(b"origin") == f"http://{host}".encode()
    assert peer.header(b"cookie") == b"sessionid=abc"
    assert peer.header(b"x-test") == b"1"
    ws.close()
    peer.join()
    no_origin = Peer()
    WebSocketClient(no_origin.url, origin="").close()
    no_origin.join()
    assert no_origin.header(b"origin") is None


def test_a_refused_handshake_raises_with_status_and_body():
    peer = Peer(reject=403)
    with pytest.raises(HandshakeError) as info:
        WebSocketClient(peer.url)
    assert (info.value.status, info.value.body) == (403, b"forbidden")
    assert ("content-length", "9") in info.value.headers
    peer.join()


def test_text_and_binary_messages_round_trip_and_fragments_are_reassembled():
    def script(peer):
        assert peer.next_event() == TextMessage("héllo")
        assert peer.next_event() == BytesMessage(b"\x00\xff")
        peer.send(TextMessage("frag", message_finished=False))
        peer.send(TextMessage("ment"))
        peer.events_until_close()

    peer = Peer(script)
    with WebSocketClient(peer.url) as ws:
        ws.send_text("héllo")
        ws.send_bytes(b"\x00\xff")
        assert ws.recv() == "fragment"
        ws.send_text("echo")
        assert ws.recv() == "echo"
        ws.send_bytes(b"echo")
        assert ws.recv() == b"echo"
    peer.join()


def test_pings_both_ways():
    def script(peer):
        peer.send(Ping(b"server ping"))
        assert peer.next_event() == Pong(b"server ping")  # answered while the client read
        peer.events_until_close()

    peer = Peer(script)
    ws = WebSocketClient(peer.url)
    assert ws.recv_event() == Ping(b"server ping")
    ws.ping(b"client ping")
    assert ws.recv_event() == Pong(b"client ping")
    ws.close()
    peer.join()


def test_without_auto_reply_pings_are_left_to_the_test():
    def script(peer):
        peer.send(Ping(b"1"))
        peer.send(TextMessage("after the ping"))
        assert peer.next_event() == TextMessage("ok")  # no pong came before it
        peer.send(CloseConnection(4000, "done"))
        assert peer.next_event() == CloseConnection(4001, "mine")

    peer = Peer(script)
    ws = WebSocketClient(peer.url, auto_reply=False)
    assert ws.recv() == "after the ping"  # skips the ping, answers nothing
    ws.send_text("ok")
    assert ws.recv_event() == CloseConnection(4000, "done")
    assert ws.close(4001, "mine") == CloseConnection(4000, "done")
    peer.join()


def test_the_servers_close_ends_recv_with_its_code_and_is_echoed():
    def script(peer):
        peer.send(TextMessage("last"))
        peer.send(CloseConnection(4001, "session ended"))
        assert peer.next_event() == CloseConnection(4001, "session ended")
        peer.sock.close()

    peer = Peer(script)
    ws = WebSocketClient(peer.url)
    assert ws.recv() == "last"
    with pytest.raises(ConnectionClosed) as info:
        ws.recv()
    assert (info.value.code, info.value.reason) == (4001, "session ended")
    with pytest.raises(ConnectionClosed):  # and stays closed
        ws.recv_event()
    assert ws.wait_eof(5)
    ws.close()
    peer.join()


def test_close_sends_the_code_and_returns_the_servers_answer():
    peer = Peer()
    ws = WebSocketClient(peer.url)
    assert ws.close(1001, "going away") == CloseConnection(1001, "going away")
    peer.join()
    assert peer.received[-1] == CloseConnection(1001, "going away")


def test_tcp_ending_without_a_close_frame_is_1006():
    peer = Peer(lambda peer: peer.sock.close())
    ws = WebSocketClient(peer.url)
    assert ws.recv_event() == CloseConnection(1006)
    with pytest.raises(ConnectionClosed) as info:
        ws.recv()
    assert info.value.code == 1006
    ws.close()
    peer.join()


def test_a_server_that_breaks_the_protocol_gets_a_close_from_the_client():
    def script(peer):
        peer.sock.sendall(b"\x83\x00")  # reserved opcode
        peer.ws = Connection(ConnectionType.SERVER)  # read the client's answer as a server would
        assert isinstance(peer.next_event(), CloseConnection)

    peer = Peer(script)
    ws = WebSocketClient(peer.url)
    event = ws.recv_event()
    assert isinstance(event, CloseConnection) and event.code == 1002
    ws.close()
    peer.join()
    assert peer.received[-1].code == 1002


def test_recv_times_out():
    peer = Peer()
    ws = WebSocketClient(peer.url)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.2)
    assert time.monotonic() - started < 2
    ws.close()
    peer.join()


def test_raw_frames_go_out_as_built_and_come_back_as_sent():
    def script(peer):
        assert peer.next_event() == TextMessage("raw", frame_finished=True, message_finished=False)
        assert peer.next_event() == TextMessage("!", frame_finished=True, message_finished=True)
        peer.sock.sendall(b"\x01\x02ab" + b"\x80\x01c" + b"\x8a\x00")  # a fragmented text, a pong
        peer.events_until_close()

    peer = Peer(script)
    ws = WebSocketClient(peer.url)
    ws.send_raw(frame(1, b"raw", fin=False) + frame(0, b"!"))
    assert ws.recv_frame() == RawFrame(1, b"ab", fin=False)
    assert ws.recv_frame() == RawFrame(0, b"c")
    assert ws.recv_frame() == (10, b"", True, 0, False)
    ws.close()
    peer.join()
    with pytest.raises(RuntimeError, match="recv_frame"):
        ws.recv_frame()


def test_wait_eof_discards_what_comes_and_tells_whether_tcp_ended():
    def script(peer):
        peer.send(Ping(b"unanswered"))
        time.sleep(0.3)
        peer.sock.close()

    peer = Peer(script)
    ws = WebSocketClient(peer.url)
    assert not ws.wait_eof(0.1)
    assert ws.wait_eof(5)
    ws.close()
    peer.join()
    assert not any(isinstance(e, Pong) for e in peer.received)


def test_only_ws_urls():
    with pytest.raises(ValueError):
        WebSocketClient("http://127.0.0.1:1/")


# -- wait_for and the time budget --------------------------------------------------------


def test_wait_for_returns_the_first_truthy_value_and_retries_errors():
    calls = []

    def predicate():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not yet")
        return len(calls) == 4 and "ready"

    assert wait_for(predicate, 5, "readiness", interval=0.01) == "ready"
    assert len(calls) == 4


def test_wait_for_fails_with_what_it_waited_for_and_the_last_error():
    def refused():
        raise ConnectionRefusedError("nobody home")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"waiting for the door \(last error: ConnectionRefusedError"):
        wait_for(refused, 0.2, "the door", interval=0.01)
    assert time.monotonic() - started < 2
    with pytest.raises(AssertionError, match=r"waiting for a miracle$"):  # a failed test, for pytest and callers
        wait_for(lambda: None, 0.01, "a miracle")


def test_the_timeout_factor_stretches_every_budget(monkeypatch):
    monkeypatch.delenv("OFFLOAD_TEST_TIMEOUT_FACTOR", raising=False)
    assert timeout_factor() == 1
    monkeypatch.setenv("OFFLOAD_TEST_TIMEOUT_FACTOR", "3")
    assert timeout_factor() == 3
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"after 0\.3 s"):
        wait_for(lambda: False, 0.1, "nothing", interval=0.01)
    assert time.monotonic() - started >= 0.3
    for bad in ("0", "-1", "fast"):
        monkeypatch.setenv("OFFLOAD_TEST_TIMEOUT_FACTOR", bad)
        with pytest.raises(ValueError):
            timeout_factor()


# -- LiveServer: which project, which commands, which login -------------------------------------


def test_the_project_is_the_working_directory_with_a_uwsgi_ini_else_the_repository(tmp_path, monkeypatch):
    repository = Path(offload.__file__).resolve().parent.parent  # the directory that holds the package
    monkeypatch.chdir(tmp_path)
    assert default_project_dir() == repository
    (tmp_path / "uwsgi.ini").write_text("[uwsgi]\n")
    assert default_project_dir() == tmp_path
    server = LiveServer(tmp_path / "var")
    assert (server.project_dir, server.ini) == (tmp_path, tmp_path / "uwsgi.ini")
    other = LiveServer(tmp_path / "var", project_dir=repository, ini="deploy/prod.ini")
    assert other.ini == repository / "deploy" / "prod.ini"
    assert LiveServer(tmp_path / "var", ini=tmp_path / "x.ini").ini == tmp_path / "x.ini"


def test_start_without_an_ini_says_where_it_looked(tmp_path):
    server = LiveServer(tmp_path / "var", project_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "uwsgi.ini")):
        server.start()


def test_prepare_runs_the_configured_manage_commands(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(LiveServer, "manage", lambda self, *args: ran.append(args))
    LiveServer(tmp_path / "var").prepare()
    assert ran == [("migrate", "--noinput"), ("collectstatic", "--noinput")]  # no demo users
    ran.clear()
    LiveServer(tmp_path / "var", prepare_commands=[("migrate",), ("loaddata", "users.json")]).prepare()
    assert ran == [("migrate",), ("loaddata", "users.json")]

    class Project(LiveServer):
        prepare_commands = (("check",),)
        password = "class-password"

    ran.clear()
    project = Project(tmp_path / "var").prepare()
    assert ran == [("check",)]
    assert project.http().password == "class-password"


class LoginForm(BaseHTTPRequestHandler):
    """A login form: a CSRF cookie on GET, a session cookie for the right password on POST."""

    password = "s3cret"
    path_expected = "/login/"

    def do_GET(self) -> None:
        self.send_response(200 if self.path == self.path_expected else 404)
        self.send_header("Set-Cookie", "csrftoken=tok; Path=/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        ok = (
            self.path == self.path_expected
            and f"password={self.password}" in body
            and "csrfmiddlewaretoken=tok" in body
        )
        self.send_response(302 if ok else 200)
        if ok:
            self.send_header("Set-Cookie", "sessionid=yes; Path=/")
            self.send_header("Location", "/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def login_form():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), LoginForm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_login_uses_the_given_url_and_password(login_form, tmp_path):
    with pytest.raises(ValueError, match="no password"):
        HttpSession(login_form, login_url="/login/").login("alice")
    with pytest.raises(AssertionError, match="login as alice failed"):
        HttpSession(login_form, login_url="/login/").login("alice", "wrong")
    session = HttpSession(login_form, login_url="/login/", password="s3cret")
    session.login("alice")
    assert session.cookie("sessionid") == "yes"
    server = LiveServer(tmp_path / "var", login_url="/login/", password="s3cret")
    server.base_url = login_form
    server.http().login("alice")


def test_tcp_connections_show_the_servers_side_of_each_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    server_side, _ = listener.accept()
    client_port = client.getsockname()[1]
    (mine,) = [c for c in tcp_connections(port) if c.peer_port == client_port]
    assert mine.state == "ESTABLISHED" and mine.inode != "0"
    client.close()  # the client's FIN: the server's side waits for the server to close
    wait_for(lambda: {c.state for c in tcp_connections(port) if c.peer_port == client_port} == {"CLOSE_WAIT"}, 5, "it")
    server_side.close()
    wait_for(lambda: not [c for c in tcp_connections(port) if c.peer_port == client_port], 5, "the server's close")
    listener.close()


def test_a_failing_manage_command_shows_its_stderr(tmp_path):
    (tmp_path / "manage.py").write_text("import sys\nsys.exit('no such command: ' + sys.argv[1])\n")
    server = LiveServer(tmp_path / "var", project_dir=tmp_path)
    with pytest.raises(subprocess.CalledProcessError, match="no such command: frobnicate"):
        server.manage("frobnicate")
