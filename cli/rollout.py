"""`effnet rollout`: roll a new checkpoint of a variant out through a running server's version endpoints.

    effnet rollout compact compact-fashion-mnist:v2 --canary 10   # load it; 10% of compact's requests once ready
    effnet rollout compact compact-fashion-mnist:v2 --promote     # the default: every request
    effnet rollout compact --rollback                             # back to the previous default
    effnet rollout compact compact-fashion-mnist:v2 --unload      # stop its workers
    effnet rollout compact                                        # each version's share and state

The server's endpoints (docs/api.md#versions) do the work; this command calls them with the admin
token and waits, with a line per second, until a loading version is ready.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _show(body: dict) -> str:
    rows = [f"{'version':44} {'state':9} {'share':>6}  default"]
    for v in body["versions"]:
        share = "rest" if v["default"] else f"{v['share'] * 100:.0f}%"
        rows.append(f"{v['tag']:44} {v['state']:9} {share:>6}  {'yes' if v['default'] else ''}"
                    + (f"   {v['error']}" if v.get("error") else ""))
    return "\n".join(rows)


def cmd_rollout(args: argparse.Namespace) -> int:
    import httpx

    from service.audit import configured_token

    token = args.token or configured_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = f"/variants/{args.variant}"
    actions = [a for a in ("canary", "promote", "rollback", "unload") if getattr(args, a) not in (None, False)]
    if len(actions) > 1:
        print(f"effnet rollout: choose one of --canary, --promote, --rollback, --unload (got {actions})", file=sys.stderr)
        return 2
    action = actions[0] if actions else None
    if action in ("canary", "promote", "unload") and not args.tag:
        print(f"effnet rollout: --{action} needs the version's TAG", file=sys.stderr)
        return 2
    try:
        with httpx.Client(base_url=args.url, timeout=60, headers=headers) as c:
            listed = c.get(f"{base}/versions")
            if listed.status_code != 200:
                return _failed(listed)
            known = {v["tag"] for v in listed.json()["versions"]} | {v["version"] for v in listed.json()["versions"]}
            if action == "canary":
                share = {"share": args.canary}
                r = (c.patch(f"{base}/versions/{args.tag}", json=share) if args.tag in known
                     else c.post(f"{base}/versions", json={"tag": args.tag, **share}))
            elif action == "promote":
                r = c.patch(f"{base}/versions/{args.tag}", json={"promote": True})
            elif action == "rollback":
                r = c.post(f"{base}/rollback")
            elif action == "unload":
                r = c.delete(f"{base}/versions/{args.tag}")
            else:
                r = listed
            if r.status_code >= 400:
                return _failed(r)
            body = r.json()
            if action == "canary" and args.wait:
                body = _wait(c, base, body.get("loading") or args.tag, args.wait_s)
                if body is None:
                    return 1
            print(_show(body))
    except httpx.HTTPError as e:
        print(f"effnet rollout: cannot reach {args.url}: {e}; is the server running (effnet serve)?", file=sys.stderr)
        return 1
    return 0


def _wait(c, base: str, tag: str, wait_s: float) -> dict | None:
    deadline, last = time.monotonic() + wait_s, None
    while True:
        body = c.get(f"{base}/versions").json()
        row = next((v for v in body["versions"] if tag in (v["tag"], v["version"])), None)
        state = row["state"] if row else "gone"
        if state != last:
            print(f"{tag}: {state}", flush=True)
            last = state
        if state in ("ready", "down"):
            return body
        if state in ("failed", "gone"):
            print(f"effnet rollout: {tag} did not load: {row.get('error') if row else 'unloaded'}", file=sys.stderr)
            return None
        if time.monotonic() > deadline:
            print(f"effnet rollout: {tag} is still {state} after {wait_s:.0f} s; `effnet rollout VARIANT` shows "
                  "it later", file=sys.stderr)
            return None
        time.sleep(1)


def _failed(r) -> int:
    try:
        why = r.json().get("error", r.text)
    except ValueError:
        why = r.text
    print(f"effnet rollout: {r.status_code}: {why}", file=sys.stderr)
    return 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollout",
        help="load a new checkpoint of a variant while serving, canary it, promote it, roll back",
        description="Drive a running server's versions of one variant (docs/api.md#versions): load a store tag "
        "into workers of its own and give it a share of the variant's requests (--canary), make it the default "
        "(--promote), return to the previous default (--rollback), or stop it (--unload). Without an action, "
        "shows each version's share and state. Uses the admin token ($EFFNET_ADMIN_TOKEN, else the token file "
        "that `effnet serve` names at start).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("variant", help="the variant, as named in the serving configuration")
    p.add_argument("tag", nargs="?", help="the version: a store tag (NAME:VERSION), or the part after the colon")
    p.add_argument("--canary", type=float, metavar="PERCENT",
                   help="load the version if it is not loaded, and give it PERCENT of the variant's requests")
    p.add_argument("--promote", action="store_true", help="make the version the default (every other share to 0)")
    p.add_argument("--rollback", action="store_true", help="make the previous default the default again")
    p.add_argument("--unload", action="store_true", help="stop the version's workers once their calls are done")
    p.add_argument("--url", default=os.environ.get("EFFNET_URL", "http://127.0.0.1:3000"),
                   help="the server (default: $EFFNET_URL, else http://127.0.0.1:3000)")
    p.add_argument("--token", help="the admin token (default: $EFFNET_ADMIN_TOKEN, else the server's token file)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="with --canary: return at once instead of waiting until the version is ready")
    p.add_argument("--wait-s", type=float, default=600, help="with --canary: how long to wait (default 600 s)")
    p.set_defaults(func=cmd_rollout)
