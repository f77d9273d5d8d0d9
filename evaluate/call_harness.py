"""The two ends of a checked run; this file runs inside the sandboxes, on the standard library only.

`serve`: in the program's sandbox. Runs the generated program as a module named `solution` (so its
`if __name__ == "__main__":` block does not run), then answers call requests read from a pipe:
call this function (or a method of an object it returned) with these arguments, reply with the
result as plain data.

`check`: in a second sandbox that holds no generated code. Runs the dataset's tests with each
function they call replaced by a stub that asks the program's sandbox for the result. Results
arrive as JSON and are decoded into plain builtins (int, str, tuple, dict, ...): whatever the
program returned, the comparison runs on data, with the builtins' own `==`. The outcome goes to
a pipe only the scorer reads.

So the program can end itself, hook exit, patch the interpreter or return objects with rigged
`__eq__`: none of it reaches the tests or the pass. What it can do is return values, as an honest
program does.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import traceback
import types

MAX_LINE = 64 << 20  # a reply larger than this is a failure, not an allocation


# ---- plain data -----------------------------------------------------------------------------------
def encode(x, refs: dict | None = None):
    """A JSON-able form of x. Objects that are not plain data stay in the program and travel as
    references (with refs: the program's registry of them)."""
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [encode(v, refs) for v in x]
    if t is tuple:
        return {"t": "tuple", "v": [encode(v, refs) for v in x]}
    if t is dict:
        return {"t": "dict", "v": [[encode(k, refs), encode(v, refs)] for k, v in x.items()]}
    if t in (set, frozenset):
        return {"t": t.__name__, "v": [encode(v, refs) for v in x]}
    if t in (bytes, bytearray):
        return {"t": "bytes", "v": bytes(x).decode("latin-1")}
    if t is complex:
        return {"t": "complex", "v": [x.real, x.imag]}
    if t is range:
        return {"t": "range", "v": [x.start, x.stop, x.step]}
    if isinstance(x, Ref):
        return {"t": "ref", "v": x._id}
    if isinstance(x, bool):
        return bool(x)
    for base in (int, float, str):  # subclasses (numpy scalars, enums): their plain value
        if isinstance(x, base):
            return base(x)
    if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return encode(x.item(), refs)
    if isinstance(x, (types.GeneratorType, map, filter, zip, reversed, enumerate)):
        return {"t": "iter", "v": [encode(v, refs) for v in x]}
    if refs is None:
        raise TypeError(f"cannot send a {type(x).__name__} to the program")
    refs[id(x)] = x
    return {"t": "ref", "v": id(x), "type": type(x).__name__}


def decode(j, make_ref):
    if j is None or type(j) in (bool, int, float, str):
        return j
    if type(j) is list:
        return [decode(v, make_ref) for v in j]
    if type(j) is not dict or "t" not in j:
        raise ValueError(f"not an encoded value: {str(j)[:100]}")
    t, v = j["t"], j.get("v")
    if t == "tuple":
        return tuple(decode(x, make_ref) for x in v)
    if t == "dict":
        return {decode(k, make_ref): decode(x, make_ref) for k, x in v}
    if t == "set":
        return {decode(x, make_ref) for x in v}
    if t == "frozenset":
        return frozenset(decode(x, make_ref) for x in v)
    if t == "bytes":
        return str(v).encode("latin-1")
    if t == "complex":
        return complex(float(v[0]), float(v[1]))
    if t == "range":
        return range(int(v[0]), int(v[1]), int(v[2]))
    if t == "iter":
        return iter([decode(x, make_ref) for x in v])
    if t == "ref":
        return make_ref(int(v), str(j.get("type", "object")))
    raise ValueError(f"unknown value type {t!r}")


class Ref:
    """An object that lives in the program; its methods are called there. Equal only to itself."""

    def __init__(self, ident: int, type_name: str, link):
        self._id, self._type, self._link = ident, type_name, link

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Remote(self._link, name, self._id)

    def __eq__(self, other):
        return isinstance(other, Ref) and other._id == self._id

    def __hash__(self):
        return hash(self._id)

    def __repr__(self):
        return f"<{self._type} object in the program>"


def _line(stream) -> bytes:
    line = stream.readline(MAX_LINE)
    if line and not line.endswith(b"\n"):
        raise ProtocolError(f"a message longer than {MAX_LINE} bytes")
    return line


# ---- the program's side ---------------------------------------------------------------------------
def serve(source_path: str, requests_fd: int, replies_fd: int) -> None:
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")
    module = types.ModuleType("solution")
    module.__file__ = os.path.abspath(source_path)
    sys.modules["solution"] = module
    with open(source_path) as f:
        code = compile(f.read(), source_path, "exec")
    exec(code, module.__dict__)
    refs: dict = {}
    while True:
        line = _line(requests)
        if not line:
            return
        msg = json.loads(line)
        try:
            target = refs[msg["on"]] if msg.get("on") is not None else None
            fn = getattr(target, msg["name"]) if target is not None else module.__dict__.get(msg["name"])
            if fn is None:
                raise NameError(f"name {msg['name']!r} is not defined")
            args = decode(msg["args"], lambda i, _t: refs[i])
            kwargs = decode(msg["kwargs"], lambda i, _t: refs[i])
            reply = {"value": encode(fn(*args, **kwargs), refs)}
        except Exception as e:  # the call failed: the tests see the exception's type and message
            reply = {"raised": type(e).__name__, "message": str(e)[:500]}
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()


# ---- the tests' side ------------------------------------------------------------------------------
class ProgramExited(BaseException):
    """The program ended (or broke the protocol) during a call. A BaseException, so a test's own
    `except Exception` cannot turn it into a pass."""


class ProtocolError(ProgramExited):
    pass


class Link:
    def __init__(self, requests_fd: int, replies_fd: int):  # the write end, the read end
        self.requests, self.replies = os.fdopen(requests_fd, "wb"), os.fdopen(replies_fd, "rb")
        self.calls = 0

    def call(self, name: str, on: int | None, args: tuple, kwargs: dict):
        self.calls += 1
        msg = {"name": name, "on": on, "args": encode(list(args)), "kwargs": encode(dict(kwargs))}
        try:
            self.requests.write(json.dumps(msg).encode() + b"\n")
            self.requests.flush()
        except BrokenPipeError:
            raise ProgramExited(f"the program had ended before the call {name}(...)") from None
        line = _line(self.replies)
        if not line:
            raise ProgramExited(f"the program ended during the call {name}(...)")
        try:
            reply = json.loads(line)
            if "raised" in reply:
                raise _exception(str(reply["raised"]), str(reply.get("message", "")))
            return decode(reply["value"], lambda i, t: Ref(i, t, self))
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"unreadable reply to {name}(...): {e}") from None


def _exception(name: str, message: str) -> Exception:
    """The program's exception as the tests see it: the builtin class of that name when there is one
    (a test may expect ValueError), else RuntimeError."""
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return RuntimeError(f"{name}: {message}")
    try:
        return cls(message)
    except Exception:
        return RuntimeError(f"{name}: {message}")


class Remote:
    """Stands in the tests' namespace for a function (or class) the program defines."""

    def __init__(self, link: Link, name: str, on: int | None = None):
        self._link, self._name, self._on = link, name, on

    def __call__(self, *args, **kwargs):
        return self._link.call(self._name, self._on, args, kwargs)

    def __repr__(self):
        return f"<{self._name} in the program>"


def check(spec_path: str, requests_fd: int, replies_fd: int, report_fd: int) -> None:
    """Run the tests; report {"status": "pass", "calls": n} or {"status": "fail", "why": ...}."""
    report = os.fdopen(report_fd, "w")
    with open(spec_path) as f:
        spec = json.load(f)
    link = Link(requests_fd, replies_fd)
    ns: dict = {"__name__": "__check__", **spec.get("vars", {})}
    try:
        exec(compile(spec["setup"], "<setup>", "exec"), ns)
        ns.update({name: Remote(link, name) for name in spec["names"]})
        exec(compile(spec["test"], "<test>", "exec"), ns)
        if link.calls == 0:
            outcome = {"status": "fail", "why": "the tests made no call to the program"}
        else:
            outcome = {"status": "pass", "calls": link.calls}
    except BaseException as e:  # noqa: BLE001  every way out of the tests that is not their end is a fail
        outcome = {"status": "fail", "why": _describe(e, spec["test"]), "exited": isinstance(e, ProgramExited)}
    report.write(json.dumps(outcome))
    report.close()


def _describe(e: BaseException, test: str) -> str:
    where = [fr for fr in traceback.extract_tb(e.__traceback__) if fr.filename == "<test>"]
    line = ""
    if where and where[-1].lineno:
        lines = test.splitlines()
        line = lines[where[-1].lineno - 1].strip()[:200] if where[-1].lineno <= len(lines) else ""
    text = f"{type(e).__name__}: {str(e)[:300]}".rstrip(": ")
    return f"{text} at `{line}`" if line else text


if __name__ == "__main__":
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # a big int is data, not an attack
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    mode, *rest = sys.argv[1:]
    if mode == "serve":
        serve(rest[0], int(rest[1]), int(rest[2]))
    elif mode == "check":
        check(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
