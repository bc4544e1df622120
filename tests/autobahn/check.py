#!/usr/bin/env python3
"""Checks Autobahn wstest fuzzingclient reports against tests/autobahn/expected.json.

usage: check.py --profile strict|all [--expected FILE] [--write-expected] REPORT_DIR...

Each REPORT_DIR holds an index.json written by wstest. Every case's `behavior` and
`behaviorClose` are tallied. Acceptable: OK, NON-STRICT, INFORMATIONAL, and UNIMPLEMENTED for
12.* / 13.* only (permessage-deflate, never negotiated). Anything else (FAILED, WRONG CODE,
UNCLEAN, UNIMPLEMENTED elsewhere, ...) fails the run, as does any difference from expected.json:
a case not plain OK that is not listed there (or listed with other behaviors), a listed case that
is now plain OK, or a different number of cases than recorded for the profile.

expected.json:
  {"totals": {"strict": N, ...},
   "cases": {"6.4.3": {"behavior": "NON-STRICT", "behaviorClose": "OK"}, ...},
   "groups": {"12.": {"behavior": "UNIMPLEMENTED", "behaviorClose": "OK"}, ...}}
"cases" lists every case that is not plain OK (both behaviors OK); "groups" gives the expected
behaviors for every case whose id starts with the key (used for the 216 compression cases).
--write-expected records the current run into the file (after a human has read the failures).
"""

import argparse
import collections
import json
import os
import sys

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}
UNIMPLEMENTED_OK_PREFIXES = ("12.", "13.")


def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def load(dirs):
    cases = {}
    for d in dirs:
        with open(os.path.join(d, "index.json")) as f:
            index = json.load(f)
        for agent, results in index.items():
            for case_id, r in results.items():
                if case_id in cases:
                    sys.exit("check.py: case %s appears twice" % case_id)
                r = dict(r)
                r["_report"] = os.path.join(d, r.get("reportfile", ""))
                r["_agent"] = agent
                cases[case_id] = r
    return cases


def acceptable(case_id, behavior):
    if behavior in ACCEPTABLE:
        return True
    return behavior == "UNIMPLEMENTED" and case_id.startswith(UNIMPLEMENTED_OK_PREFIXES)


def detail(r):
    """One line from the case report: what was expected vs. observed at close."""
    try:
        with open(r["_report"]) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return ""
    bits = []
    for k in ("result", "resultClose"):
        if rep.get(k):
            bits.append("%s: %s" % (k, rep[k]))
    bits.append(
        "close code local=%s remote=%s wasClean=%s droppedByMe=%s"
        % (rep.get("localCloseCode"), rep.get("remoteCloseCode"), rep.get("wasClean"), rep.get("droppedByMe"))
    )
    return "; ".join(bits)


def expected_for(expected, case_id):
    if case_id in expected.get("cases", {}):
        return expected["cases"][case_id]
    for prefix, exp in expected.get("groups", {}).items():
        if case_id.startswith(prefix):
            return exp
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--expected", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected.json"))
    ap.add_argument("--write-expected", action="store_true")
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args()

    cases = load(args.dirs)
    ids = sorted(cases, key=case_key)

    # Tally: one count per case and field (behavior, behaviorClose).
    tally = {"behavior": collections.Counter(), "behaviorClose": collections.Counter()}
    for cid in ids:
        for field in tally:
            tally[field][cases[cid].get(field, "MISSING")] += 1

    def fmt(counter):
        order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "WRONG CODE", "UNCLEAN"]
        keys = order + sorted(k for k in counter if k not in order)
        return ", ".join("%d %s" % (counter[k], k) for k in keys if counter[k] or k in ("OK", "FAILED"))

    print("autobahn: %d cases (profile %s)" % (len(ids), args.profile))
    print("autobahn: behavior:      " + fmt(tally["behavior"]))
    print("autobahn: behaviorClose: " + fmt(tally["behaviorClose"]))

    bad = []
    not_ok = {}
    for cid in ids:
        r = cases[cid]
        b, bc = r.get("behavior", "MISSING"), r.get("behaviorClose", "MISSING")
        if (b, bc) != ("OK", "OK"):
            not_ok[cid] = {"behavior": b, "behaviorClose": bc}
        if not (acceptable(cid, b) and acceptable(cid, bc)):
            bad.append(cid)

    # Non-OK cases, compressed for the 12.*/13.* UNIMPLEMENTED block.
    shown_groups = collections.Counter()
    for cid, v in not_ok.items():
        if v["behavior"] == "UNIMPLEMENTED" and cid.startswith(UNIMPLEMENTED_OK_PREFIXES) and cid not in bad:
            shown_groups[cid.split(".")[0] + ".*"] += 1
            continue
        mark = "UNACCEPTABLE" if cid in bad else "acceptable"
        r = cases[cid]
        print("  %-9s behavior=%-14s behaviorClose=%-14s %s (%sms) %s"
              % (cid, v["behavior"], v["behaviorClose"], mark, r.get("duration"), os.path.relpath(r["_report"])))
        if cid in bad:
            print("            " + detail(r))
    for g, n in sorted(shown_groups.items()):
        print("  %-9s %d cases UNIMPLEMENTED (permessage-deflate not negotiated; acceptable)" % (g, n))

    if args.write_expected:
        try:
            with open(args.expected) as f:
                expected = json.load(f)
        except OSError:
            expected = {}
        expected.setdefault("totals", {})[args.profile] = len(ids)
        groups = expected.setdefault("groups", {})
        for p in UNIMPLEMENTED_OK_PREFIXES:
            groups[p] = {"behavior": "UNIMPLEMENTED", "behaviorClose": "OK"}
        listed = expected.setdefault("cases", {})
        for cid in ids:  # this run is authoritative for the cases it ran
            listed.pop(cid, None)
        for cid, v in not_ok.items():
            if expected_for(expected, cid) != v:
                listed[cid] = v
        expected["cases"] = {k: listed[k] for k in sorted(listed, key=case_key)}
        expected["groups"] = {k: groups[k] for k in sorted(groups)}
        with open(args.expected, "w") as f:
            json.dump(expected, f, indent=2)
            f.write("\n")
        print("autobahn: wrote %s" % args.expected)

    try:
        with open(args.expected) as f:
            expected = json.load(f)
    except OSError as e:
        sys.exit("autobahn: cannot read %s: %s" % (args.expected, e))

    diffs = []
    total = expected.get("totals", {}).get(args.profile)
    if total is None:
        diffs.append("expected.json has no total for profile %r" % args.profile)
    elif total != len(ids):
        diffs.append("ran %d cases, expected.json says %d for profile %s" % (len(ids), total, args.profile))
    for cid in ids:
        got = not_ok.get(cid, {"behavior": "OK", "behaviorClose": "OK"})
        exp = expected_for(expected, cid) or {"behavior": "OK", "behaviorClose": "OK"}
        if got != exp:
            diffs.append("%s: got behavior=%s behaviorClose=%s, expected behavior=%s behaviorClose=%s"
                         % (cid, got["behavior"], got["behaviorClose"], exp["behavior"], exp["behaviorClose"]))
    for d in diffs:
        print("  differs from expected.json: " + d)

    if bad or diffs:
        print("autobahn: FAIL (%d unacceptable cases, %d differences from expected.json)" % (len(bad), len(diffs)))
    else:
        print("autobahn: PASS (%d cases, all acceptable and as in expected.json)" % len(ids))
    return 1 if bad or diffs else 0


if __name__ == "__main__":
    sys.exit(main())
