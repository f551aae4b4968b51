#!/usr/bin/env python3
"""Writes kvm-watcher.json: the container runtimes' default seccomp profile
(containers-common's /usr/share/containers/seccomp.json) resolved for what
kvm-watcher runs with -- x86-64, only CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE --
plus bpf(2) and perf_event_open(2), which the default allows only with
CAP_SYS_ADMIN although the kernel itself checks CAP_BPF and CAP_PERFMON.

The result is a plain OCI profile (no capability or architecture conditions),
so containerd, CRI-O (a kubelet's Localhost profile) and podman read it alike.
Usage: deploy/seccomp/generate.py [/usr/share/containers/seccomp.json]
"""
import json
import os
import sys

CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"}
ARCHES = {"amd64", "x86", "x32"}
NEEDED = ["bpf", "perf_event_open"]

src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/containers/seccomp.json"
default = json.load(open(src))
rules = []
for rule in default["syscalls"]:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if not set(inc.get("caps", [])) <= CAPS or CAPS & set(exc.get("caps", [])):
        continue
    if "arches" in inc and not ARCHES & set(inc["arches"]):
        continue
    if "arches" in exc and ARCHES & set(exc["arches"]):
        continue
    names = [n for n in rule["names"] if n not in NEEDED]
    if not names:
        continue
    out = {"names": names, "action": rule["action"]}
    if rule.get("args"):
        out["args"] = rule["args"]
    if "errnoRet" in rule:
        out["errnoRet"] = rule["errnoRet"]
    rules.append(out)
rules.append({"names": NEEDED, "action": "SCMP_ACT_ALLOW"})
profile = {
    "defaultAction": default["defaultAction"],
    "defaultErrnoRet": default.get("defaultErrnoRet", 1),
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": rules,
}
dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvm-watcher.json")
with open(dest, "w") as f:
    json.dump(profile, f, indent=1)
    f.write("\n")
