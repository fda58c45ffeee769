"""A webhook receiver for fluxo's tests: HTTPS with the suite's certificate,
each delivery verified by the Standard Webhooks reference library.

    receiver.py SECRET CERT KEY [SCRIPT]

SCRIPT is a comma-separated list of what to do with each delivery in turn,
then the last one for the rest: a status code (`200`, `503`, `410`), `big`
(200 with a 64 KiB body) or `stall` (read the request, answer nothing for
60 s). SECRET or SCRIPT given as `@PATH` is read from that file at each
delivery, so a test can set the secret once it has one, rotate it, or end an
outage; a changed script file starts its list again. It prints `port N` once
listening, then one JSON line per delivery:
{"id", "verified", "error", "answer", "body", "signatures", "conn"}, `conn` naming
the connection it came on (the sender's port). Connections are HTTP/1.1 and kept
alive, as real receivers' are; with FLUXO_TEST_RECEIVER_IDLE_SECS set, one idle
that long is closed by the receiver, which prints {"closed": conn}.
"""
import http.server
import json
import os
import ssl
import sys
import threading
import time

from standardwebhooks.webhooks import Webhook

secret_arg, cert, key = sys.argv[1:4]
script_arg = sys.argv[4] if len(sys.argv) > 4 else "200"
lock = threading.Lock()
print_lock = threading.Lock()
count = [0]
last_script = [None]


def current(arg):
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            return f.read().strip()
    return arg


def next_answer():
    text = current(script_arg)
    with lock:
        if text != last_script[0]:
            last_script[0], count[0] = text, 0
        script = text.split(",")
        answer = script[min(count[0], len(script) - 1)]
        count[0] += 1
    return answer


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    idle = os.environ.get("FLUXO_TEST_RECEIVER_IDLE_SECS")
    timeout = float(idle) if idle else None
    timed_out = False

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        answer = next_answer()
        try:
            Webhook(current(secret_arg)).verify(body, {k.lower(): v for k, v in self.headers.items()})
            verified, error = True, ""
        except Exception as e:  # the library raises its own types
            verified, error = False, repr(e)
        line = json.dumps({"id": self.headers.get("webhook-id"), "verified": verified, "error": error,
                           "answer": answer, "body": body.decode(errors="replace"),
                           "signatures": len(self.headers.get("webhook-signature", "").split()),
                           "conn": self.client_address[1]})
        # One line per delivery, whole: deliveries arrive on several threads at once.
        with print_lock:
            print(line, flush=True)
        if answer == "stall":
            time.sleep(60)
            return
        status, payload = (200, b"x" * 65536) if answer == "big" else (int(answer), b"thanks")
        self.send_response(status)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass

    def log_error(self, format, *args):
        # The one error worth a line: an idle connection closed by its timeout.
        self.timed_out = self.timed_out or format.startswith("Request timed out")

    def finish(self):
        super().finish()
        if self.timed_out:
            with print_lock:
                print(json.dumps({"closed": self.client_address[1]}), flush=True)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
# The handshake happens in each connection's own thread, not in accept(): many
# deliveries at once must not queue behind one another's handshakes.
server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
print(f"port {server.server_address[1]}", flush=True)
server.serve_forever()
