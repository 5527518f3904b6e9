"""wrk as the load generator: prepared multipart bodies, a Lua script that counts answers by status, and
its one line of figures.

wrk (C, a tenth of the CPU of a Python client) is what a user points at an HTTP endpoint to find its
ceiling; the soak and the serving benchmark drive it the same way. The Lua side cycles through the
bodies, pauses `delay_ms` before each request (0: closed loop; the Debian wrk has no fixed-rate mode),
counts answers by status and prints the figures from done(), the only callback that sees every
thread's counts.
"""
from __future__ import annotations

import json
from pathlib import Path

WRK = "wrk"
RESULT_PREFIX = "EFFNET_WRK "

SCRIPT = r"""
local folder, n, boundary = %(folder)s, %(n)d, %(boundary)s
local client_prefix, clients, pause = %(client_prefix)s, %(clients)d, %(delay_ms)d
local bodies, i, threads = {}, 0, {}
counts = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  for k = 1, n do
    local f = assert(io.open(folder .. "/body-" .. (k - 1) .. ".bin", "rb"))
    bodies[k] = f:read("*a"); f:close()
  end
end
function delay() return pause end
function request()
  i = i + 1
  return wrk.format("POST", "/classify", {["Host"] = wrk.headers["Host"],
    ["Content-Type"] = "multipart/form-data; boundary=" .. boundary,
    ["X-Client-Id"] = client_prefix .. (i %% clients)}, bodies[(i %% n) + 1])
end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for status, c in pairs(t:get("counts")) do all[status] = (all[status] or 0) + c end
  end
  local parts = {}
  for status, c in pairs(all) do table.insert(parts, string.format('"%%d": %%d', status, c)) end
  local e = summary.errors
  io.write(string.format('EFFNET_WRK {"duration_us": %%d, "requests": %%d, "statuses": {%%s}, '
    .. '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "connect_errors": %%d, '
    .. '"read_errors": %%d, "write_errors": %%d, "timeouts": %%d}\n',
    summary.duration, summary.requests, table.concat(parts, ", "), latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout))
end
"""
SOCKET_ERRORS = ("connect_errors", "read_errors", "write_errors", "timeouts")


def multipart_body(image: bytes, fields: dict, boundary: str, filename: str = "img",
                   content_type: str = "application/octet-stream") -> bytes:
    """One `/classify` form: the text fields and the image, as curl -F sends them."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def write_script(path: Path, folder: Path, n: int, boundary: str, client_prefix: str, clients: int,
                 delay_ms: int = 0) -> Path:
    """The Lua script for `n` bodies `folder/body-K.bin`; each request's X-Client-Id is one of `clients`."""
    path.write_text(SCRIPT % {"folder": json.dumps(str(folder)), "n": n, "boundary": json.dumps(boundary),
                              "client_prefix": json.dumps(client_prefix), "clients": clients,
                              "delay_ms": delay_ms})
    return path


def read_result(stdout: str, stderr: str = "", returncode: int = 0) -> dict:
    """The figures wrk's script printed (durations in microseconds, statuses as strings); raises when
    wrk failed or printed none."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {returncode}): {(stderr or stdout)[-1000:]}")
    return json.loads(line.removeprefix(RESULT_PREFIX))
