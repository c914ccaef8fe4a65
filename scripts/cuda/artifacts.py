#!/usr/bin/env python3
"""Lists the executables in cargo's JSON messages (`--message-format=json...`).

Reads the messages on stdin, passes compiler diagnostics through to stderr and
prints one tab-separated line per executable artifact:

    KIND  PACKAGE  TARGET  PATH

KIND is `bin`, `example`, `test` (integration test, or a lib/bin unit-test
harness) or `bench` (a `[[bench]]` target). Used by scripts/build-cuda.sh.
"""

import json
import sys


def kind_of(msg: dict) -> str:
    kinds = msg["target"]["kind"]
    if "bench" in kinds:
        return "bench"
    if "test" in kinds or msg["profile"].get("test"):
        return "test"
    if "example" in kinds:
        return "example"
    return "bin"


def package_name(msg: dict) -> str:
    # package_id is "path+file:///…/crate#name@0.1.0" (or "name 0.1.0 (…)" on old cargo)
    pid = msg["package_id"]
    if "#" in pid:
        tail = pid.rsplit("#", 1)[1]
        return tail.split("@", 1)[0] if "@" in tail else pid.rsplit("/", 1)[-1].split("#")[0]
    return pid.split(" ", 1)[0]


def main() -> None:
    for line in sys.stdin:
        line = line.strip()
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        reason = msg.get("reason")
        if reason == "compiler-message":
            rendered = msg.get("message", {}).get("rendered")
            if rendered:
                sys.stderr.write(rendered)
        elif reason == "compiler-artifact" and msg.get("executable"):
            print(f"{kind_of(msg)}\t{package_name(msg)}\t{msg['target']['name']}\t{msg['executable']}")
        elif reason == "build-finished" and not msg.get("success", False):
            sys.exit(1)


if __name__ == "__main__":
    main()
