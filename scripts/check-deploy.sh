#!/usr/bin/env bash
# scripts/check-deploy.sh: static checks of the deployment files under deploy/.
#
# Run from the repository root (it cds there itself); `make test` runs it. Needs bash and
# python3 with PyYAML (installed with pip into a cache directory when missing). Uses
# systemd-analyze, kubectl (kustomize only, no cluster) and `docker compose` (config only, no
# engine) when they are installed, and says "skip" when they are not. Needs no docker engine,
# no cluster, and no network unless PyYAML has to be installed. Prints one line per check
# (ok / FAIL / skip / pending); exits 1 if any check failed. Takes about a second.
#
# What it guards: every YAML file parses; the shutdown grace stays below every stop timeout
# (systemd TimeoutStopSec, compose stop_grace_period, k8s terminationGracePeriodSeconds);
# probes point at /readyz and /healthz on the metrics port; manifests reference each other
# consistently; every DROVER_* variable used in deploy/ is one the binary reads; the units
# verify; the Dockerfile builds with the same cargo command as the Makefile's `build` target;
# Postgres and RabbitMQ are TLS-only in compose and k8s-cluster, every URL (compose secrets,
# k8s Secrets) uses TLS with a CA file mounted beside it, each part uses its own accounts and
# the RabbitMQ definitions grant the permissions docs/security.md documents. In k8s/ the
# worker, the dashboard (Deployment + Service), the producer CronJob and the migrate Job each
# run non-root with a read-only root filesystem, no privilege escalation and no capabilities,
# take every credential as a file from their own drover-<part>-credentials Secret (never an
# env value or a secretKeyRef), connect as RabbitMQ drover-<part> and a Postgres login no
# other part uses. Compose is only checked statically: there is no Docker engine in CI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

failures=0
line() { printf '%-8s %s\n' "$1" "$2"; }
ok() { line ok "$1"; }
fail() { line FAIL "$1"; failures=$((failures + 1)); }
skip() { line skip "$1"; }
pending() { line pending "$1"; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
probe_server_pid=
cleanup() {
    if [[ -n $probe_server_pid ]]; then kill "$probe_server_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# ---- python3 + PyYAML ----------------------------------------------------------------------
if ! command -v python3 >/dev/null; then
    fail "python3: not installed (apt-get install python3 python3-yaml); cannot check YAML"
    exit 1
fi
pylib="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/drover-check-deploy/pylib"
if python3 -c 'import yaml' 2>/dev/null; then
    ok "pyyaml: importable"
elif PYTHONPATH="$pylib" python3 -c 'import yaml' 2>/dev/null; then
    export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"
    ok "pyyaml: importable from $pylib"
elif python3 -m pip install --quiet --disable-pip-version-check --target "$pylib" pyyaml \
        >"$tmp/pip.log" 2>&1 \
    && PYTHONPATH="$pylib" python3 -c 'import yaml' 2>/dev/null; then
    export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"
    ok "pyyaml: installed into $pylib"
else
    sed 's/^/         /' "$tmp/pip.log" 2>/dev/null | tail -5 || true
    fail "pyyaml: not importable and 'pip install --target $pylib pyyaml' failed; install python3-yaml"
    exit 1
fi

# ---- YAML, Kubernetes, Compose, systemd settings, Dockerfile (python) ------------------------
# The python part prints its own lines in the same format and exits with its failure count.
py_failures=0
python3 - <<'PY' || py_failures=$?
import glob, os, re, subprocess, sys
import yaml

failures = 0
def line(tag, msg): print(f"{tag:<8} {msg}", flush=True)
def ok(msg): line("ok", msg)
def skip(msg): line("skip", msg)
def fail(msg):
    global failures
    failures += 1
    line("FAIL", msg)
def check(cond, good, bad):
    ok(good) if cond else fail(bad)
    return cond

# A loader that rejects duplicate keys (PyYAML silently keeps the last one).
class StrictLoader(yaml.SafeLoader):
    pass
def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)
StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

def get(d, *path, default=None):
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return default
    return d

def seconds(value):
    """Durations: 45, "45", "45s", "1m30s", "1min 30s", "2min" -> seconds (None if unparsable)."""
    if isinstance(value, int):
        return value
    s = str(value).strip().replace(" ", "")
    if re.fullmatch(r"\d+", s):
        return int(s)
    units = {"h": 3600, "min": 60, "m": 60, "s": 1, "sec": 1, "ms": 0.001}
    parts = re.findall(r"(\d+)(h|min|ms|m|sec|s)", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        return None
    return sum(int(n) * units[u] for n, u in parts)

# ---- (a) every YAML file under deploy/ parses -----------------------------------------------
docs_by_file = {}
unparsable = set()
yaml_files = sorted(glob.glob("deploy/**/*.yaml", recursive=True)
                    + glob.glob("deploy/**/*.yml", recursive=True))
if not yaml_files:
    fail("yaml: no *.yaml/*.yml files under deploy/")
for path in yaml_files:
    try:
        with open(path) as f:
            docs = [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        fail(f"yaml: {path}: {str(e).splitlines()[0]} {getattr(e, 'problem_mark', '') or ''}".strip())
        unparsable.add(path)
        continue
    docs_by_file[path] = docs
    ok(f"yaml: {path} parses ({len(docs)} document{'s' if len(docs) != 1 else ''})")

# ---- the variables the binary reads ------------------------------------------------------------
known_vars = set()
for src in glob.glob("crates/**/*.rs", recursive=True):
    with open(src, errors="replace") as f:
        known_vars.update(re.findall(r'"((?:DROVER_[A-Z0-9_]+)|DATABASE_URL)"', f.read()))
def unknown_drover_vars(names):
    return sorted(n for n in names if (n.startswith("DROVER_") or n == "DATABASE_URL")
                  and n not in known_vars)

# ---- (b) Kubernetes ------------------------------------------------------------------------------
k8s_dir = "deploy/k8s"
k8s_docs = []   # (file, doc)
for path, docs in sorted(docs_by_file.items()):
    if os.path.dirname(path) == k8s_dir and os.path.basename(path) not in ("kustomization.yaml", "kustomization.yml"):
        k8s_docs += [(path, d) for d in docs]

def of_kind(kind):
    return [d for _, d in k8s_docs if isinstance(d, dict) and d.get("kind") == kind]

if any(os.path.dirname(p) == k8s_dir for p in unparsable):
    skip("k8s: manifest checks: not run until the YAML errors above are fixed")
elif not k8s_docs:
    fail(f"k8s: no manifests parsed under {k8s_dir}/")
else:
    bad = [f"{p}: {get(d, 'kind') or '?'}" for p, d in k8s_docs
           if not (isinstance(d, dict) and d.get("apiVersion") and d.get("kind") and get(d, "metadata", "name"))]
    check(not bad, f"k8s: all {len(k8s_docs)} documents have apiVersion, kind, metadata.name",
          f"k8s: documents missing apiVersion/kind/metadata.name: {', '.join(bad)}")
    namespaced = [f"{p}: {d.get('kind')}/{get(d, 'metadata', 'name')}" for p, d in k8s_docs
                  if isinstance(d, dict) and get(d, "metadata", "namespace")]
    check(not namespaced, "k8s: no manifest hard-codes metadata.namespace",
          f"k8s: metadata.namespace set (manifests must be namespace-agnostic): {', '.join(namespaced)}")

    # kustomization lists exactly the manifest files
    kust = docs_by_file.get(f"{k8s_dir}/kustomization.yaml", [None])[0]
    files = sorted(os.path.basename(p) for p in glob.glob(f"{k8s_dir}/*.yaml")
                   if os.path.basename(p) != "kustomization.yaml")
    listed = sorted(get(kust, "resources", default=[]) or [])
    check(listed == files, f"k8s: kustomization.yaml lists all {len(files)} manifests",
          f"k8s: kustomization.yaml resources {listed} != files {files}")

    cms = {get(d, "metadata", "name"): d for d in of_kind("ConfigMap")}
    secrets = {get(d, "metadata", "name"): d for d in of_kind("Secret")}
    deps = of_kind("Deployment")
    jobs = of_kind("Job")
    cronjobs = of_kind("CronJob")
    def first_args(pod_spec):
        return (get(pod_spec, "containers", 0, "args") or [None])[0]
    worker_deps = [d for d in deps if first_args(get(d, "spec", "template", "spec", default={})) == "worker"]
    cm_data = {}
    for cm in cms.values():
        cm_data.update(get(cm, "data", default={}) or {})
    secret_keys = set()
    for s in secrets.values():
        secret_keys |= set((get(s, "stringData", default={}) or {}).keys())
        secret_keys |= set((get(s, "data", default={}) or {}).keys())
    check("DROVER_AMQP_URL" in secret_keys,
          "k8s: a Secret holds KEDA's DROVER_AMQP_URL",
          f"k8s: no Secret holds DROVER_AMQP_URL for KEDA (has {sorted(secret_keys)})")
    leaked = sorted(k for k in cm_data if k in ("DATABASE_URL", "DROVER_AMQP_URL"))
    check(not leaked, "k8s: no connection URL in the ConfigMap",
          f"k8s: {leaked} belong in the Secret, not the ConfigMap")
    unknown = unknown_drover_vars(cm_data)
    check(not unknown, "k8s: every DROVER_* key in the ConfigMap is read by the binary",
          f"k8s: ConfigMap keys the binary does not read (typo?): {unknown}")

    def env_of(container):
        env = {}
        for e in container.get("env", []) or []:
            env[e.get("name")] = e.get("value")
        return env

    def check_worker_image(kind, name, container):
        """The dashboard, the migrate Job and the producer CronJob run the worker's image."""
        if not worker_deps:
            return
        dimg = get(worker_deps[0], "spec", "template", "spec", "containers", 0, "image")
        check(container.get("image") == dimg, f"k8s: {kind} {name} and the worker use image {dimg}",
              f"k8s: {kind} {name} image {container.get('image')!r} differs from the worker's {dimg!r}")

    def check_env_from(kind, name, pod_spec):
        """The ConfigMap through envFrom; the credentials as files from a secret volume
        (DATABASE_URL_FILE, DROVER_AMQP_URL_FILE), never as environment values."""
        refs = []
        problems = []
        volumes = {v.get("name"): v for v in pod_spec.get("volumes", []) or []}
        for c in pod_spec.get("containers", []) or []:
            for ef in c.get("envFrom", []) or []:
                if "configMapRef" in ef:
                    refs.append(("ConfigMap", ef["configMapRef"].get("name"), cms))
                if "secretRef" in ef:
                    problems.append(f"envFrom secretRef {ef['secretRef'].get('name')} "
                                    "(mount credentials as files)")
            env = env_of(c)
            for var in ("DATABASE_URL", "DROVER_AMQP_URL"):
                if var in env:
                    problems.append(f"{var} in env (use {var}_FILE)")
            mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts", []) or []}
            for var, key in (("DATABASE_URL_FILE", "database-url"), ("DROVER_AMQP_URL_FILE", "amqp-url")):
                path = env.get(var) or ""
                mount = os.path.dirname(path)
                vol = volumes.get(mounts.get(mount), {})
                sname = get(vol, "secret", "secretName")
                if not path:
                    problems.append(f"{var} not set")
                elif sname not in secrets:
                    problems.append(f"{var} {path}: not in a volume of a Secret in the manifests")
                else:
                    sec = secrets[sname]
                    keys = set((get(sec, "stringData", default={}) or {}).keys()) | set((get(sec, "data", default={}) or {}).keys())
                    if os.path.basename(path) not in keys:
                        problems.append(f"{var} {path}: Secret {sname} has no key {os.path.basename(path)}")
        kinds = {k for k, _, _ in refs}
        missing = [f"{k} {n}" for k, n, known in refs if n not in known]
        check("ConfigMap" in kinds and not missing and not problems,
              f"k8s: {kind} {name} takes its env from the ConfigMap, its credentials as files from a Secret",
              f"k8s: {kind} {name}: " + "; ".join(
                  (["envFrom must reference the manifests' ConfigMap"] if "ConfigMap" not in kinds else [])
                  + ([f"unknown: {', '.join(missing)}"] if missing else []) + problems))

    if len(worker_deps) != 1:
        fail(f"k8s: expected one Deployment running `drover worker`, found {len(worker_deps)}")
    else:
        dep = worker_deps[0]
        dname = get(dep, "metadata", "name")
        pod = get(dep, "spec", "template", "spec", default={})
        containers = pod.get("containers", []) or []
        c = containers[0] if containers else {}
        check_env_from("Deployment", dname, pod)
        check(c.get("args") == ["worker"] or c.get("command") in (["drover", "worker"],),
              "k8s: the Deployment runs `drover worker`",
              f"k8s: the Deployment's container args are {c.get('args')!r}, expected ['worker']")

        # shutdown grace vs terminationGracePeriodSeconds
        env = env_of(c)
        grace_raw = env.get("DROVER_SHUTDOWN_GRACE_SECS", cm_data.get("DROVER_SHUTDOWN_GRACE_SECS"))
        tgps = pod.get("terminationGracePeriodSeconds")
        if grace_raw is None:
            fail("k8s: DROVER_SHUTDOWN_GRACE_SECS is not set in the ConfigMap (the relation to "
                 "terminationGracePeriodSeconds must be explicit)")
        elif not isinstance(tgps, int):
            fail(f"k8s: Deployment terminationGracePeriodSeconds missing or not an integer: {tgps!r}")
        else:
            grace = int(str(grace_raw))
            check(tgps > grace,
                  f"k8s: terminationGracePeriodSeconds {tgps} > DROVER_SHUTDOWN_GRACE_SECS {grace}",
                  f"k8s: terminationGracePeriodSeconds {tgps} must exceed DROVER_SHUTDOWN_GRACE_SECS {grace}")

        # probes and the metrics port
        addr = env.get("DROVER_METRICS_ADDR", cm_data.get("DROVER_METRICS_ADDR", "127.0.0.1:9464"))
        host, _, mport = str(addr).rpartition(":")
        check(host.strip("[]") in ("0.0.0.0", "::", ""),
              f"k8s: DROVER_METRICS_ADDR {addr} listens on the pod IP",
              f"k8s: DROVER_METRICS_ADDR {addr} is not reachable by the kubelet's probes (use 0.0.0.0:PORT)")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", []) or []}
        def probe_target(probe):
            hg = get(c, probe, "httpGet", default={}) or {}
            port = hg.get("port")
            return hg.get("path"), ports.get(port, port)
        for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            path, port = probe_target(probe)
            check(path == want and str(port) == mport,
                  f"k8s: {probe} GET {path} on port {port}",
                  f"k8s: {probe} must GET {want} on the metrics port {mport}; it has {path!r} on {port!r}")
        if "startupProbe" in c:
            path, port = probe_target("startupProbe")
            check(path == "/healthz" and str(port) == mport, f"k8s: startupProbe GET {path} on port {port}",
                  f"k8s: startupProbe should GET /healthz on port {mport}; it has {path!r} on {port!r}")
        ann = get(dep, "spec", "template", "metadata", "annotations", default={}) or {}
        check(ann.get("prometheus.io/scrape") == "true" and str(ann.get("prometheus.io/port")) == mport
              and ann.get("prometheus.io/path", "/metrics") == "/metrics",
              f"k8s: prometheus.io annotations scrape :{mport}/metrics",
              f"k8s: prometheus.io annotations {ann} do not match the metrics port {mport}")

        # non-root, read-only root, a writable mount for the output root
        psc = pod.get("securityContext", {}) or {}
        csc = c.get("securityContext", {}) or {}
        check((psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) is True and csc.get("readOnlyRootFilesystem") is True,
              "k8s: runAsNonRoot and readOnlyRootFilesystem",
              "k8s: the worker must set runAsNonRoot: true and readOnlyRootFilesystem: true")
        out = env.get("DROVER_OUTPUT_ROOT", cm_data.get("DROVER_OUTPUT_ROOT"))
        mounts = [m.get("mountPath", "") for m in c.get("volumeMounts", []) or []]
        covered = out and any(out == m or out.startswith(m.rstrip("/") + "/") for m in mounts)
        check(bool(covered), f"k8s: the output root {out} is on a mounted volume",
              f"k8s: DROVER_OUTPUT_ROOT {out!r} is not under any volumeMount {mounts} (root fs is read-only)")
        res = c.get("resources", {}) or {}
        check(get(res, "requests", "memory") and get(res, "limits", "memory"),
              "k8s: memory requests and limits set",
              "k8s: the worker needs memory requests and limits (batch memory)")

        # PDB and KEDA target the Deployment
        labels = get(dep, "spec", "template", "metadata", "labels", default={}) or {}
        for pdb in of_kind("PodDisruptionBudget"):
            sel = get(pdb, "spec", "selector", "matchLabels", default={}) or {}
            check(sel and all(labels.get(k) == v for k, v in sel.items()),
                  f"k8s: PodDisruptionBudget {get(pdb, 'metadata', 'name')} selects the worker pods",
                  f"k8s: PodDisruptionBudget selector {sel} does not match the pod labels {labels}")
        ns = cm_data.get("DROVER_NAMESPACE", "drover")
        auths = {get(d, "metadata", "name"): d for d in of_kind("TriggerAuthentication")}
        for so in of_kind("ScaledObject"):
            target = get(so, "spec", "scaleTargetRef", "name")
            check(target == dname, f"k8s: ScaledObject scales Deployment {target}",
                  f"k8s: ScaledObject targets {target!r}, the Deployment is {dname!r}")
            for t in get(so, "spec", "triggers", default=[]) or []:
                if t.get("type") != "rabbitmq":
                    continue
                md = t.get("metadata", {}) or {}
                check(md.get("queueName") == f"{ns}.jobs" and md.get("mode") == "QueueLength" and md.get("value"),
                      f"k8s: KEDA rabbitmq trigger on {md.get('queueName')}, QueueLength {md.get('value')}",
                      f"k8s: KEDA trigger must watch {ns}.jobs in QueueLength mode with a value; has {md}")
                auth = auths.get(get(t, "authenticationRef", "name"))
                refs = get(auth, "spec", "secretTargetRef", default=[]) or []
                good = [r for r in refs if r.get("parameter") == "host"
                        and r.get("name") in secrets and r.get("key") in secret_keys]
                check(bool(good), "k8s: KEDA reads the broker host from the Secret",
                      "k8s: the trigger's TriggerAuthentication must map `host` to a key of the Secret")

    for job in jobs:
        jname = get(job, "metadata", "name")
        pod = get(job, "spec", "template", "spec", default={})
        c = (pod.get("containers") or [{}])[0]
        check((c.get("args") or [None])[0] == "migrate" and isinstance(get(job, "spec", "backoffLimit"), int)
              and pod.get("restartPolicy") in ("Never", "OnFailure"),
              f"k8s: Job {jname} runs `drover migrate` with backoffLimit {get(job, 'spec', 'backoffLimit')}",
              f"k8s: Job {jname} must run args ['migrate', ...] with a backoffLimit and restartPolicy Never/OnFailure")
        check_env_from("Job", jname, pod)
        check_worker_image("Job", jname, c)
    if not jobs:
        fail("k8s: no migrate Job")

    # The dashboard: a Deployment running `drover dashboard` on the pod IP, probed on its port,
    # behind a Service that selects it.
    dash_deps = [d for d in deps if first_args(get(d, "spec", "template", "spec", default={})) == "dashboard"]
    if len(dash_deps) != 1:
        fail(f"k8s: expected one Deployment running `drover dashboard`, found {len(dash_deps)}")
    else:
        dd = dash_deps[0]
        ddname = get(dd, "metadata", "name")
        pod = get(dd, "spec", "template", "spec", default={})
        c = (pod.get("containers") or [{}])[0]
        check_env_from("Deployment", ddname, pod)
        env = env_of(c)
        addr = str(env.get("DROVER_DASHBOARD_ADDR", cm_data.get("DROVER_DASHBOARD_ADDR", "127.0.0.1:8080")))
        for i, a in enumerate(c.get("args") or []):
            if a == "--addr" and i + 1 < len(c["args"]):
                addr = str(c["args"][i + 1])
            elif str(a).startswith("--addr="):
                addr = str(a).split("=", 1)[1]
        host, _, aport = addr.rpartition(":")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", []) or []}
        check(host.strip("[]") in ("0.0.0.0", "::") and str(aport) in map(str, ports.values()),
              f"k8s: Deployment {ddname} listens on {addr}, a declared container port",
              f"k8s: Deployment {ddname}: DROVER_DASHBOARD_ADDR/--addr {addr!r} must be 0.0.0.0:PORT with PORT a containerPort {ports}")
        bad = []
        for probe in ("readinessProbe", "livenessProbe"):
            pr = c.get(probe)
            if not isinstance(pr, dict):
                bad.append(f"no {probe}")
                continue
            target = get(pr, "httpGet", "port", default=get(pr, "tcpSocket", "port"))
            if str(ports.get(target, target)) != str(aport):
                bad.append(f"{probe} on port {target!r}, not {aport}")
        check(not bad, f"k8s: Deployment {ddname}: readiness and liveness probes on port {aport}",
              f"k8s: Deployment {ddname}: {'; '.join(bad)}")
        if any(str(a).startswith("--admin-token") and not str(a).startswith("--admin-token-file") for a in c.get("args") or []):
            fail(f"k8s: Deployment {ddname}: --admin-token on the command line (visible in the process list); use DROVER_DASHBOARD_TOKEN_FILE")
        check_worker_image("Deployment", ddname, c)
        labels = get(dd, "spec", "template", "metadata", "labels", default={}) or {}
        svcs = [sv for sv in of_kind("Service")
                if (get(sv, "spec", "selector", default={}) or {})
                and all(labels.get(k) == v for k, v in get(sv, "spec", "selector").items())]
        # A Service selecting the worker pods too would send browsers to a worker.
        wlabels = get(worker_deps[0], "spec", "template", "metadata", "labels", default={}) if worker_deps else {}
        svc_ok = [sv for sv in svcs
                  if not all((wlabels or {}).get(k) == v for k, v in get(sv, "spec", "selector").items())
                  and all(str(ports.get(sp.get("targetPort"), sp.get("targetPort"))) == str(aport)
                          for sp in get(sv, "spec", "ports", default=[]) or [])]
        check(bool(svc_ok) and all(get(sv, "spec", "type", default="ClusterIP") == "ClusterIP" for sv in svc_ok),
              f"k8s: Service {', '.join(get(sv, 'metadata', 'name') for sv in svc_ok)} (ClusterIP) selects only the dashboard pods, on port {aport}",
              f"k8s: no ClusterIP Service selects only the dashboard pods {labels} with targetPort {aport}")

    # The producer example: a CronJob running `drover publish`.
    prod = [cj for cj in cronjobs
            if first_args(get(cj, "spec", "jobTemplate", "spec", "template", "spec", default={})) == "publish"]
    if len(prod) != 1:
        fail(f"k8s: expected one CronJob running `drover publish`, found {len(prod)}")
    else:
        cj = prod[0]
        cname = get(cj, "metadata", "name")
        pod = get(cj, "spec", "jobTemplate", "spec", "template", "spec", default={})
        c = (pod.get("containers") or [{}])[0]
        check(isinstance(get(cj, "spec", "jobTemplate", "spec", "backoffLimit"), int)
              and pod.get("restartPolicy") in ("Never", "OnFailure") and get(cj, "spec", "concurrencyPolicy") == "Forbid",
              f"k8s: CronJob {cname} runs `drover publish`, backoffLimit {get(cj, 'spec', 'jobTemplate', 'spec', 'backoffLimit')}, concurrencyPolicy Forbid",
              f"k8s: CronJob {cname} needs a backoffLimit, restartPolicy Never/OnFailure and concurrencyPolicy Forbid")
        check_env_from("CronJob", cname, pod)
        check_worker_image("CronJob", cname, c)

    # kustomize renders (client-side only): the base and the HA overlay (which must live beside
    # the base, not inside it: kustomize refuses an overlay under its own base as a cycle)
    for kdir in (k8s_dir, "deploy/k8s-cluster"):
        try:
            r = subprocess.run(["kubectl", "kustomize", kdir], capture_output=True, text=True, timeout=30)
            check(r.returncode == 0, f"k8s: kubectl kustomize {kdir} renders",
                  f"k8s: kubectl kustomize {kdir} failed: {r.stderr.strip()[:300]}")
        except FileNotFoundError:
            skip(f"k8s: kubectl kustomize {kdir}: kubectl not installed")
        except subprocess.TimeoutExpired:
            fail(f"k8s: kubectl kustomize {kdir} timed out")

# ---- (c) systemd settings (systemd-analyze verify runs in the bash part) ----------------------
def env_file(path):
    env = {}
    with open(path) as f:
        for raw in f:
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            if "=" not in s:
                fail(f"systemd: {path}: not KEY=value: {s!r}")
                continue
            k, v = s.split("=", 1)
            env[k.strip()] = v.strip().strip('"').strip("'")
    return env

def unit(path):
    entries, section = [], None
    with open(path) as f:
        for raw in f:
            s = raw.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("["):
                section = s
                continue
            k, _, v = s.partition("=")
            entries.append((section, k.strip(), v.strip()))
    return entries

env_example = "deploy/systemd/drover.env.example"
if not os.path.exists(env_example):
    fail(f"systemd: {env_example} missing")
else:
    env = env_file(env_example)
    unknown = unknown_drover_vars(env)
    check(not unknown, f"systemd: every DROVER_* variable in {os.path.basename(env_example)} is read by the binary",
          f"systemd: {env_example} sets variables the binary does not read (typo?): {unknown}")
    grace = int(env.get("DROVER_SHUTDOWN_GRACE_SECS", "30"))
    worker_units = sorted(glob.glob("deploy/systemd/drover-worker*.service"))
    if not worker_units:
        fail("systemd: no deploy/systemd/drover-worker*.service")
    parsed = {}
    for path in worker_units:
        entries = unit(path)
        parsed[path] = entries
        svc = {k: v for sec, k, v in entries if sec == "[Service]"}
        name = os.path.basename(path)
        t = seconds(svc.get("TimeoutStopSec", "")) if "TimeoutStopSec" in svc else None
        check(t is not None and t > grace,
              f"systemd: {name}: TimeoutStopSec {t} > DROVER_SHUTDOWN_GRACE_SECS {grace}",
              f"systemd: {name}: TimeoutStopSec {svc.get('TimeoutStopSec')!r} must exceed DROVER_SHUTDOWN_GRACE_SECS {grace}")
        want = {"KillSignal": "SIGTERM", "User": "drover", "EnvironmentFile": "/etc/drover/drover.env",
                "Restart": "on-failure", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "PrivateTmp": "yes"}
        wrong = [f"{k}={svc.get(k)!r}" for k, v in want.items() if svc.get(k) != v]
        wrong += [] if "/var/lib/drover" in svc.get("ReadWritePaths", "").split() else ["ReadWritePaths lacks /var/lib/drover"]
        wrong += [] if re.match(r"/usr/local/bin/drover worker\b", svc.get("ExecStart", "")) else [f"ExecStart={svc.get('ExecStart')!r}"]
        check(not wrong, f"systemd: {name}: SIGTERM drain, drover user, env file, restart, hardening",
              f"systemd: {name}: unexpected {', '.join(wrong)}")
    base, tmpl = "deploy/systemd/drover-worker.service", "deploy/systemd/drover-worker@.service"
    if base in parsed and tmpl in parsed:
        allowed = {"ExecStart", "Environment"}
        def service_lines(p):
            return sorted((k, v) for sec, k, v in parsed[p] if sec == "[Service]" and k not in allowed)
        a, b = service_lines(base), service_lines(tmpl)
        diff = sorted(set(a) ^ set(b))
        check(not diff, "systemd: drover-worker@.service's [Service] matches drover-worker.service",
              f"systemd: the template and the single unit differ in [Service]: {diff}")

    # Credentials: no URL or token in the environment file; every unit loads its own part's
    # URLs as systemd credentials and points drover at them in %d (docs/security.md).
    leaked = sorted(k for k in env if k in ("DATABASE_URL", "DROVER_AMQP_URL", "DROVER_DASHBOARD_TOKEN"))
    check(not leaked, f"systemd: {os.path.basename(env_example)} holds no credential",
          f"systemd: {env_example} sets {leaked}: use the units' LoadCredential= files")
    UNIT_PART = {"drover-worker.service": "worker", "drover-worker@.service": "worker",
                 "drover-migrate.service": "admin", "drover-dashboard.service": "dashboard"}
    for path in sorted(glob.glob("deploy/systemd/*.service")):
        name = os.path.basename(path)
        part = UNIT_PART.get(name)
        entries = [(k, v) for sec, k, v in unit(path) if sec == "[Service]"]
        creds = dict(v.split(":", 1) for k, v in entries if k == "LoadCredential" and ":" in v)
        uenv = dict(v.strip('"').split("=", 1) for k, v in entries if k == "Environment" and "=" in v)
        probs = []
        if part is None:
            probs.append("no part known for this unit (add it to UNIT_PART in scripts/check-deploy.sh)")
        for var in ("DATABASE_URL", "DROVER_AMQP_URL", "DROVER_DASHBOARD_TOKEN"):
            if var in uenv:
                probs.append(f"Environment={var}=... (use {var}_FILE=%d/...)")
        for var, key in (("DATABASE_URL_FILE", "database-url"), ("DROVER_AMQP_URL_FILE", "amqp-url"),
                         ("DROVER_DASHBOARD_TOKEN_FILE", "admin-token")):
            val = uenv.get(var)
            if val is None:
                if var != "DROVER_DASHBOARD_TOKEN_FILE":
                    probs.append(f"{var} not set")
                continue
            cid = val[3:] if val.startswith("%d/") else None
            want = f"/etc/drover/credentials/{part}-{key}"
            if cid is None:
                probs.append(f"{var}={val} is not in the credentials directory (%d/ID)")
            elif cid not in creds:
                probs.append(f"{var}={val}: no LoadCredential={cid}:...")
            elif part and creds[cid] != want:
                probs.append(f"{var}: LoadCredential={cid}:{creds[cid]}, expected {want} (its own part's)")
        check(not probs, f"systemd: {name}: the {part}'s credentials via LoadCredential= and %d, none in the environment",
              f"systemd: {name}: {'; '.join(probs)}")

# ---- (d) compose (structure; `docker compose config` runs in the bash part) -------------------
compose_path = "deploy/compose.yaml"
compose = (docs_by_file.get(compose_path) or [None])[0]
if {compose_path, "deploy/otel-collector.yaml"} & unparsable:
    skip("compose: structure checks: not run until the YAML errors above are fixed")
elif not isinstance(compose, dict):
    fail(f"compose: {compose_path} missing or empty")
else:
    services = compose.get("services", {}) or {}
    need = ["rabbitmq", "postgres", "migrate", "worker", "otel-collector"]
    missing = [s for s in need if s not in services]
    check(not missing, f"compose: services {', '.join(need)} present",
          f"compose: missing services {missing}")
    def depends(svc):
        d = get(services, svc, "depends_on", default={}) or {}
        return {k: "service_started" for k in d} if isinstance(d, list) else {k: (v or {}).get("condition", "service_started") for k, v in d.items()}
    dangling = sorted({f"{s} -> {t}" for s in services for t in depends(s) if t not in services})
    check(not dangling, "compose: every depends_on names a service", f"compose: depends_on unknown services: {dangling}")
    hc = lambda s: " ".join(map(str, get(services, s, "healthcheck", "test", default=[]) or []))
    check("rabbitmq-diagnostics" in hc("rabbitmq") and "ping" in hc("rabbitmq"),
          "compose: rabbitmq healthcheck is rabbitmq-diagnostics ping",
          f"compose: rabbitmq healthcheck {hc('rabbitmq')!r}")
    check("pg_isready" in hc("postgres"), "compose: postgres healthcheck is pg_isready",
          f"compose: postgres healthcheck {hc('postgres')!r}")
    m = services.get("migrate", {}) or {}
    mcmd = m.get("command")
    check((mcmd == "migrate" or (isinstance(mcmd, list) and mcmd[:1] == ["migrate"])) and str(m.get("restart")) == "no"
          and depends("migrate").get("postgres") == "service_healthy",
          "compose: migrate runs `drover migrate` once, after postgres is healthy",
          f"compose: migrate needs command [migrate], restart \"no\", depends_on postgres service_healthy")
    w = services.get("worker", {}) or {}
    wd = depends("worker")
    check(wd.get("migrate") == "service_completed_successfully" and wd.get("rabbitmq") == "service_healthy"
          and wd.get("postgres") == "service_healthy",
          "compose: worker waits for healthy rabbitmq/postgres and a completed migrate",
          f"compose: worker depends_on conditions are {wd}")
    wenv = w.get("environment", {}) or {}
    if isinstance(wenv, list):
        wenv = dict(e.split("=", 1) for e in wenv if "=" in e)
    unknown = unknown_drover_vars(wenv)
    check(not unknown, "compose: every DROVER_* variable is read by the binary",
          f"compose: variables the binary does not read (typo?): {unknown}")
    grace = int(str(wenv.get("DROVER_SHUTDOWN_GRACE_SECS", 30)))
    sgp = seconds(w.get("stop_grace_period", "10s"))
    check(sgp is not None and sgp > grace,
          f"compose: worker stop_grace_period {w.get('stop_grace_period')} > DROVER_SHUTDOWN_GRACE_SECS {grace}",
          f"compose: worker stop_grace_period {w.get('stop_grace_period')!r} must exceed DROVER_SHUTDOWN_GRACE_SECS {grace}")
    maddr = str(wenv.get("DROVER_METRICS_ADDR", ""))
    check(maddr.startswith("0.0.0.0:") and "/healthz" in hc("worker"),
          f"compose: worker listens on {maddr} and its healthcheck probes /healthz",
          f"compose: worker needs DROVER_METRICS_ADDR=0.0.0.0:PORT (has {maddr!r}) and a /healthz healthcheck ({hc('worker')!r})")
    replicas = get(w, "deploy", "replicas", default=1)
    check(isinstance(replicas, int) and replicas >= 2, f"compose: worker runs {replicas} replicas",
          f"compose: worker replicas {replicas!r}, expected at least 2")
    otel = str(wenv.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    mo = re.fullmatch(r"http://([a-z0-9-]+):4318/?", otel)
    check(bool(mo) and mo.group(1) in services,
          f"compose: workers export OTLP/HTTP to {otel}",
          f"compose: OTEL_EXPORTER_OTLP_ENDPOINT {otel!r} must be http://<collector service>:4318 (drover speaks OTLP/HTTP)")
    # builds and mounted files resolve relative to deploy/
    for name, svc in services.items():
        b = svc.get("build")
        if isinstance(b, dict):
            df = os.path.normpath(os.path.join("deploy", b.get("context", "."), b.get("dockerfile", "Dockerfile")))
            check(os.path.isfile(df), f"compose: {name} builds {df}", f"compose: {name}: dockerfile {df} does not exist")
        for v in svc.get("volumes", []) or []:
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("./") and not os.path.exists(os.path.join("deploy", src)):
                fail(f"compose: {name} mounts {src}, which does not exist in deploy/")
    otel_cfg = (docs_by_file.get("deploy/otel-collector.yaml") or [None])[0]
    pipe = get(otel_cfg, "service", "pipelines", "traces", default={}) or {}
    http_ep = str(get(otel_cfg, "receivers", "otlp", "protocols", "http", "endpoint", default=""))
    check("otlp" in (pipe.get("receivers") or []) and any(str(e).split("/")[0] == "debug" for e in pipe.get("exporters") or [])
          and http_ep.endswith(":4318") and not http_ep.startswith(("localhost", "127.")),
          "compose: otel-collector.yaml: OTLP/HTTP receiver on :4318 -> debug exporter (traces)",
          f"compose: otel-collector.yaml needs a traces pipeline otlp -> debug and an http receiver on 0.0.0.0:4318 (has {http_ep!r})")

# ---- (f) TLS-only services and least-privilege accounts (docs/security.md) ---------------------
# Compose is checked statically only (there is no Docker engine here): every credential is a
# secret file; every URL uses TLS with a CA file its service mounts; each drover service uses
# its own part's accounts; Postgres and RabbitMQ are configured TLS-only; the RabbitMQ
# definitions grant exactly the documented permissions. The same for the k8s Secrets.
import json
from urllib.parse import urlsplit, parse_qs

def url_problems(url, kind, mounted_paths):
    """Why a URL is not TLS with a CA file among mounted_paths ([] when it is)."""
    probs = []
    q = parse_qs(urlsplit(url).query)
    if kind == "db":
        if q.get("sslmode") != ["verify-full"]:
            probs.append("needs sslmode=verify-full")
        ca = (q.get("sslrootcert") or [""])[0]
    else:
        if not url.startswith("amqps://"):
            probs.append("needs amqps://")
        ca = (q.get("cacertfile") or [""])[0]
    if not ca:
        probs.append("names no CA file (sslrootcert= / cacertfile=)")
    elif ca not in mounted_paths:
        probs.append(f"CA {ca} is not mounted")
    return probs

defs_path = "deploy/secrets/rabbitmq-definitions.json"
PERMS = {  # user: (configure, write, read), the table in docs/security.md
    "drover-admin": (r"^drover(\.(jobs|dead|dlx|poison))?$",) * 3,
    "drover-worker": (r"^$", r"^amq\.default$", r"^drover\.(jobs|poison)$"),
    "drover-producer": (r"^$", r"^amq\.default$", r"^$"),
    "drover-dashboard": (r"^$", r"^$", r"^$"),
}
try:
    defs = json.load(open(defs_path))
except (OSError, ValueError) as e:
    defs = None
    fail(f"security: {defs_path}: {e}")
if defs is not None:
    vhosts = [v.get("name") for v in defs.get("vhosts", [])]
    got = {p.get("user"): (p.get("configure"), p.get("write"), p.get("read"))
           for p in defs.get("permissions", []) if p.get("vhost") == "drover"}
    users = sorted(u.get("name") for u in defs.get("users", []))
    check(vhosts == ["drover"] and got == PERMS and users == sorted(PERMS),
          "security: RabbitMQ definitions: vhost drover, users admin/worker/producer/dashboard with the documented permissions",
          f"security: {defs_path}: vhosts {vhosts}, users {users}, permissions {got} differ from docs/security.md's {PERMS}")
    # What the regexes allow, as RabbitMQ matches them (re.search on the name).
    allowed = lambda rx, name: re.search(rx, name) is not None
    w, pr = PERMS["drover-worker"], PERMS["drover-producer"]
    check(not allowed(w[0], "drover.jobs") and allowed(w[2], "drover.jobs") and allowed(w[2], "drover.poison")
          and allowed(w[1], "amq.default") and not allowed(pr[2], "drover.jobs") and not allowed(pr[0], "drover.jobs"),
          "security: a worker may consume but not delete drover.jobs; a producer may publish but not consume",
          "security: the permission regexes let a worker delete or a producer consume")

if isinstance(compose, dict):
    services = compose.get("services", {}) or {}
    top = compose.get("secrets", {}) or {}
    probs = []
    for name, sfile in top.items():
        f = os.path.normpath(os.path.join("deploy", (sfile or {}).get("file", "")))
        if not os.path.isfile(f) and not f.startswith("deploy/secrets/tls/"):
            probs.append(f"secret {name}: {f} missing")
    expect = {"migrate": "admin", "cli": "admin", "worker": "worker", "producer": "producer", "dashboard": "dashboard"}
    for name, svc in services.items():
        env = svc.get("environment", {}) or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env if "=" in e)
        for var in ("DATABASE_URL", "DROVER_AMQP_URL", "POSTGRES_PASSWORD", "RABBITMQ_DEFAULT_PASS", "DROVER_DASHBOARD_TOKEN"):
            if var in env:
                probs.append(f"{name}: {var} in the environment (use a secret file)")
        mine = svc.get("secrets", []) or []
        mounted = {f"/run/secrets/{s}" for s in mine}
        for s in mine:
            if s not in top:
                probs.append(f"{name}: secret {s} is not defined")
        for var, kind in (("DATABASE_URL_FILE", "db"), ("DROVER_AMQP_URL_FILE", "amqp")):
            path = env.get(var)
            if not path:
                continue
            secret = os.path.basename(path)
            if path not in mounted:
                probs.append(f"{name}: {var} {path} is not one of its secrets")
                continue
            part = expect.get(name)
            if part and not secret.startswith(f"{part}-"):
                probs.append(f"{name}: {var} is {secret}, expected the {part}'s")
            f = os.path.join("deploy", (top.get(secret) or {}).get("file", ""))
            if os.path.isfile(f):
                for pr_ in url_problems(open(f).read().strip(), kind, mounted):
                    probs.append(f"{name}: {secret}: {pr_}")
    for name in ("worker", "dashboard", "producer", "migrate"):
        if name not in services:
            probs.append(f"service {name} missing")
    check(not probs, "security: compose: every credential a secret file; TLS URLs with a mounted CA; each part its own accounts",
          "security: compose: " + "; ".join(probs))
    pg = services.get("postgres", {}) or {}
    pg_cmd = " ".join(map(str, pg.get("entrypoint") or [])) + " " + " ".join(map(str, pg.get("command") or []))
    try:
        hba = [l.split() for l in open("deploy/postgres-hba.conf") if l.strip() and not l.startswith("#")]
    except OSError:
        hba = []
    tcp = [l for l in hba if l[0] != "local"]
    check("ssl=on" in pg_cmd and "hba_file=" in pg_cmd and tcp and all(l[0] == "hostssl" or l[-1] == "reject" for l in tcp)
          and any(l[0] == "host" and l[-1] == "reject" for l in tcp) and "POSTGRES_PASSWORD_FILE" in (pg.get("environment") or {}),
          "security: compose: Postgres TLS only (ssl=on, postgres-hba.conf: hostssl, plain host rejected), password from a file",
          f"security: compose: Postgres must run ssl=on with deploy/postgres-hba.conf (hostssl lines, `host ... reject`) and POSTGRES_PASSWORD_FILE; has {pg_cmd!r}, {hba}")
    try:
        rconf = dict(l.split("=", 1) for l in open("deploy/rabbitmq.conf") if "=" in l and not l.startswith("#"))
        rconf = {k.strip(): v.strip() for k, v in rconf.items()}
    except OSError:
        rconf = {}
    rmq = services.get("rabbitmq", {}) or {}
    rvols = " ".join(map(str, rmq.get("volumes") or []))
    check(rconf.get("listeners.tcp") == "none" and "listeners.ssl.default" in rconf and "load_definitions" in rconf
          and "./rabbitmq.conf:" in rvols and "rabbitmq-definitions" in (rmq.get("secrets") or [])
          and "RABBITMQ_DEFAULT_PASS" not in (rmq.get("environment") or {}),
          "security: compose: RabbitMQ TLS only (listeners.tcp = none), users from the mounted definitions",
          f"security: compose: deploy/rabbitmq.conf needs listeners.tcp = none, an ssl listener and load_definitions, mounted with the definitions secret; has {rconf}")

# Every Postgres or RabbitMQ URL the deploy docs and units show uses TLS and names a CA
# (KEDA's URL in k8s/ takes its CA as a separate parameter, checked above).
class _AnyPath:
    def __contains__(self, _):
        return True
url_re = re.compile(r"(?:postgres(?:ql)?|amqps?)://[^\s`'\"<>)|]+")
probs = []
for f in sorted(glob.glob("deploy/systemd/*") + ["deploy/docker/README.md", "deploy/README.md"]):
    try:
        text = open(f).read()
    except OSError:
        continue
    for n, l in enumerate(text.splitlines(), 1):
        for u in url_re.findall(l):
            if "@" not in u:
                continue  # the scheme in prose, not a URL with an account
            kind = "db" if u.startswith("postgres") else "amqp"
            for pr_ in url_problems(u.rstrip(".,;:"), kind, _AnyPath()):
                probs.append(f"{f}:{n}: {u[:60]}: {pr_}")
check(not probs, "security: systemd, docker and deploy READMEs: every URL with an account uses TLS and names a CA",
      "security: " + "; ".join(probs[:8]))

if k8s_docs:
    probs = []
    for sname, sec in {get(d, "metadata", "name"): d for d in of_kind("Secret")}.items():
        data = get(sec, "stringData", default={}) or {}
        keys = set(data)
        mounted = {f"/run/secrets/drover/{k}" for k in keys}
        for key, kind in (("database-url", "db"), ("amqp-url", "amqp")):
            if key in data:
                for pr_ in url_problems(str(data[key]), kind, mounted):
                    probs.append(f"Secret {sname} {key}: {pr_}")
        if "DROVER_AMQP_URL" in data:
            if not str(data["DROVER_AMQP_URL"]).startswith("amqps://") or data.get("tls") != "enable" or "ca.pem" not in keys:
                probs.append(f"Secret {sname}: KEDA's DROVER_AMQP_URL needs amqps://, tls: enable and ca.pem")
    check(not probs, "security: k8s: every URL in the Secrets uses TLS with the CA file mounted beside it",
          "security: k8s: " + "; ".join(probs))

    # Every workload (Deployment, Job, CronJob): hardened like the worker, credentials only as
    # files from its own part's Secret, mounted where its URLs name the CA, and its own
    # accounts: RabbitMQ drover-<part> (the definitions' users) and a Postgres login no other
    # part uses.
    secrets_by_name = {get(d, "metadata", "name"): d for d in of_kind("Secret")}
    PART_OF = {"worker": "worker", "dashboard": "dashboard", "publish": "producer", "migrate": "admin"}
    workloads = ([("Deployment", d, get(d, "spec", "template", "spec", default={})) for d in of_kind("Deployment")]
                 + [("Job", d, get(d, "spec", "template", "spec", default={})) for d in of_kind("Job")]
                 + [("CronJob", d, get(d, "spec", "jobTemplate", "spec", "template", "spec", default={}))
                    for d in of_kind("CronJob")])
    db_users = {}
    for kind, d, pod in workloads:
        wname = f"{kind} {get(d, 'metadata', 'name')}"
        wp = []
        if pod.get("automountServiceAccountToken") is not False:
            wp.append("automountServiceAccountToken is not false")
        psc = pod.get("securityContext", {}) or {}
        containers = pod.get("containers", []) or []
        part = PART_OF.get((get(containers, 0, "args") or [None])[0])
        if part is None:
            wp.append(f"runs {get(containers, 0, 'args')!r}: no known part (worker, dashboard, publish, migrate)")
        volumes = {v.get("name"): v for v in pod.get("volumes", []) or []}
        for c in containers + (pod.get("initContainers", []) or []):
            csc = c.get("securityContext", {}) or {}
            if (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True
                    or csc.get("runAsUser", psc.get("runAsUser", 0)) == 0):
                wp.append(f"{c.get('name')}: not runAsNonRoot with a non-zero runAsUser")
            if csc.get("readOnlyRootFilesystem") is not True:
                wp.append(f"{c.get('name')}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                wp.append(f"{c.get('name')}: allowPrivilegeEscalation is not false")
            if "ALL" not in (get(csc, "capabilities", "drop") or []):
                wp.append(f"{c.get('name')}: capabilities.drop lacks ALL")
            for e in c.get("env", []) or []:
                if get(e, "valueFrom", "secretKeyRef"):
                    wp.append(f"{c.get('name')}: {e.get('name')} from a secretKeyRef (mount it as a file)")
                if e.get("name") in ("DATABASE_URL", "DROVER_AMQP_URL", "DROVER_DASHBOARD_TOKEN"):
                    wp.append(f"{c.get('name')}: {e.get('name')} in env (use {e.get('name')}_FILE)")
            if any(str(a).startswith(("--database-url=", "--amqp-url=")) or a in ("--database-url", "--amqp-url")
                   for a in c.get("args") or []):
                wp.append(f"{c.get('name')}: a credential URL on the command line")
            env = env_of(c)
            mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts", []) or []}
            for var in ("DATABASE_URL_FILE", "DROVER_AMQP_URL_FILE", "DROVER_DASHBOARD_TOKEN_FILE"):
                path = env.get(var)
                if not path:
                    continue
                mdir = os.path.dirname(path)
                sname = get(volumes.get(mounts.get(mdir), {}), "secret", "secretName")
                sec = secrets_by_name.get(sname)
                if sec is None:
                    wp.append(f"{var} {path} is not in a mounted Secret of the manifests")
                    continue
                if part and sname != f"drover-{part}-credentials":
                    wp.append(f"{var} comes from Secret {sname}, expected drover-{part}-credentials")
                data = get(sec, "stringData", default={}) or {}
                value = data.get(os.path.basename(path))
                if value is None:
                    wp.append(f"{var}: Secret {sname} has no key {os.path.basename(path)}")
                    continue
                if var == "DROVER_DASHBOARD_TOKEN_FILE":
                    continue
                mounted_here = {f"{mdir}/{k}" for k in data}
                kind_ = "db" if var == "DATABASE_URL_FILE" else "amqp"
                for pr_ in url_problems(str(value), kind_, mounted_here):
                    wp.append(f"{var} ({sname}): {pr_}")
                user = urlsplit(str(value).split(",")[0]).username
                if kind_ == "amqp" and part and user != f"drover-{part}":
                    wp.append(f"{var}: RabbitMQ user {user!r}, expected drover-{part} (deploy/secrets/rabbitmq-definitions.json)")
                if kind_ == "amqp" and user not in PERMS:
                    wp.append(f"{var}: RabbitMQ user {user!r} is not in the definitions")
                if kind_ == "db" and part:
                    db_users.setdefault(user, set()).add(part)
        check(not wp, f"security: k8s: {wname} ({part}): non-root, read-only root, no escalation, no capabilities; its own accounts, as files over TLS",
              f"security: k8s: {wname}: " + "; ".join(wp))
    shared = {u: sorted(ps) for u, ps in db_users.items() if len(ps) > 1}
    check(not shared and {"worker", "dashboard", "producer", "admin"} <= set().union(*db_users.values(), set()),
          f"security: k8s: the worker, dashboard, producer and migration each log in to Postgres as their own user {sorted(db_users)}",
          f"security: k8s: Postgres logins shared between parts {shared} or a part missing (have {sorted(set().union(*db_users.values(), set()))})")
    # The cluster overlay brings the base's manifests but not its example Secrets: it must
    # delete every one of them, or applying it overwrites the real credentials.
    ckust = (docs_by_file.get("deploy/k8s-cluster/kustomization.yaml") or [None])[0]
    deleted = set()
    for pt in get(ckust, "patches", default=[]) or []:
        try:
            pd = yaml.safe_load(pt.get("patch", "")) if isinstance(pt, dict) else None
        except yaml.YAMLError:
            pd = None
        if isinstance(pd, dict) and pd.get("$patch") == "delete" and pd.get("kind") == "Secret":
            deleted.add(get(pd, "metadata", "name"))
    kept = sorted(set(secrets_by_name) - deleted)
    check(ckust is None or not kept, "security: k8s-cluster: the overlay deletes every example Secret of the base",
          f"security: k8s-cluster/kustomization.yaml does not delete the base's example Secrets {kept}: applying it would overwrite the real ones")
    cluster = {}
    for f in ("deploy/k8s-cluster/rabbitmq-cluster.yaml", "deploy/k8s-cluster/postgres-cluster.yaml"):
        for d in docs_by_file.get(f) or []:
            if isinstance(d, dict):
                cluster[d.get("kind")] = d
    rc, pc = cluster.get("RabbitmqCluster"), cluster.get("Cluster")
    vols = get(rc, "spec", "override", "statefulSet", "spec", "template", "spec", "volumes", default=[]) or []
    hba = get(pc, "spec", "postgresql", "pg_hba", default=[]) or []
    check(rc is not None and get(rc, "spec", "tls", "disableNonTLSListeners") is True
          and "load_definitions" in str(get(rc, "spec", "rabbitmq", "additionalConfig", default=""))
          and any(get(v, "secret", "secretName") == "drover-rabbitmq-definitions" for v in vols)
          and pc is not None and get(pc, "spec", "certificates", "serverTLSSecret")
          and any(str(h).startswith("hostssl") for h in hba) and any(str(h).startswith("host ") and str(h).endswith("reject") for h in hba),
          "security: k8s-cluster: RabbitMQ TLS only with the definitions Secret mounted; Postgres hostssl only",
          "security: k8s-cluster: RabbitmqCluster needs tls.disableNonTLSListeners and the mounted definitions; the Postgres Cluster a serverTLSSecret and pg_hba hostssl + host reject")

# ---- (e, static part) the Dockerfile -----------------------------------------------------------
dockerfile = "deploy/docker/Dockerfile"
if not os.path.isfile(dockerfile):
    fail(f"docker: {dockerfile} missing")
else:
    text = open(dockerfile).read()
    logical = re.sub(r"\\\n", " ", text)
    stmts = [l.strip() for l in logical.splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [s.split()[1] for s in stmts if s.upper().startswith("FROM ")]
    check(froms[:1] == ["rust:1-bookworm"] and froms[-1:] == ["debian:bookworm-slim"],
          f"docker: stages {' -> '.join(froms)}",
          f"docker: expected FROM rust:1-bookworm ... FROM debian:bookworm-slim, found {froms}")
    runtime = stmts[max(i for i, s in enumerate(stmts) if s.upper().startswith("FROM ")):]
    def last(instr):
        v = [s[len(instr):].strip() for s in runtime if s.upper().startswith(instr + " ")]
        return v[-1] if v else None
    problems = []
    if (last("USER") or "").split(":")[0] != "10001": problems.append(f"USER {last('USER')}")
    if last("ENTRYPOINT") != '["drover"]': problems.append(f"ENTRYPOINT {last('ENTRYPOINT')}")
    if last("CMD") != '["worker"]': problems.append(f"CMD {last('CMD')}")
    if "9464" not in (last("EXPOSE") or "").split(): problems.append(f"EXPOSE {last('EXPOSE')}")
    if "/healthz" not in (last("HEALTHCHECK") or ""): problems.append("HEALTHCHECK without /healthz")
    check(not problems, "docker: runtime user 10001, ENTRYPOINT drover, CMD worker, EXPOSE 9464, HEALTHCHECK /healthz",
          f"docker: runtime stage: {', '.join(problems)}")
    # COPY sources from the context exist and are not filtered out by the ignore file
    ignore_path = dockerfile + ".dockerignore"
    ignore = [l.strip() for l in open(ignore_path)] if os.path.exists(ignore_path) else []
    ignore = [l for l in ignore if l and not l.startswith("#")]
    needed = ["Cargo.toml", "Cargo.lock", "crates", "migrations"]
    dropped = [n for n in needed if n in ignore or n + "/" in ignore]
    check(os.path.exists(ignore_path) and not dropped,
          f"docker: {os.path.basename(ignore_path)} keeps {', '.join(needed)} in the context",
          f"docker: {ignore_path} missing or excludes {dropped}")
    bad_copies = []
    for s in stmts:
        if s.upper().startswith("COPY ") and "--from=" not in s:
            srcs = [t for t in s.split()[1:] if not t.startswith("--")][:-1]
            for src in srcs:
                if src == ".":
                    continue
                if not os.path.exists(src):
                    bad_copies.append(f"{src} does not exist")
                elif any(src == p or src.startswith(p.rstrip("/") + "/") for p in ignore) and f"!{src}" not in ignore:
                    bad_copies.append(f"{src} is excluded by {ignore_path}")
    check(not bad_copies, "docker: COPY sources exist and are in the build context",
          f"docker: COPY sources: {'; '.join(bad_copies)}")

sys.exit(min(failures, 100))
PY
failures=$((failures + py_failures))

# ---- (c) systemd-analyze verify ----------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    # verify insists that ExecStart binaries exist: check copies pointing at /bin/true.
    mkdir -p "$tmp/units"
    for f in deploy/systemd/*.service; do
        name=$(basename "$f")
        [[ $name == *@.service ]] && name=${name/@.service/@9464.service}
        sed 's#/usr/local/bin/drover#/bin/true#g' "$f" >"$tmp/units/$name"
    done
    # One run over all units (they reference each other); each message names its file.
    verify_rc=0
    verify_out=$(cd "$tmp/units" && systemd-analyze verify --man=no ./*.service 2>&1) || verify_rc=$?
    for u in "$tmp"/units/*.service; do
        name=$(basename "$u")
        msgs=$(grep -F "$name" <<<"$verify_out" | sed "s#$tmp/units/##" | tr '\n' ' ' | cut -c1-400 || true)
        if [[ -z $msgs ]]; then
            ok "systemd: systemd-analyze verify $name"
        else
            fail "systemd: systemd-analyze verify $name: $msgs"
        fi
    done
    if ((verify_rc != 0)) && ! grep -qF '.service' <<<"$verify_out"; then
        fail "systemd: systemd-analyze verify exited $verify_rc: $(tr '\n' ' ' <<<"$verify_out" | cut -c1-400)"
    fi
else
    skip "systemd: systemd-analyze verify: systemd-analyze not installed"
fi

# ---- (d) docker compose config -----------------------------------------------------------------
if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
    if out=$(docker compose -f deploy/compose.yaml config -q 2>&1); then
        ok "compose: docker compose config -q"
    else
        fail "compose: docker compose config -q: $(tr '\n' ' ' <<<"$out" | cut -c1-400)"
    fi
else
    skip "compose: docker compose config: the compose plugin is not installed (structure checked above)"
fi

# ---- the container health probe ----------------------------------------------------------------
probe=deploy/docker/drover-probe
if ! bash -n "$probe"; then
    fail "docker: $probe has syntax errors"
else
    # Against a stand-in server: 200 on /healthz, 503 elsewhere.
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 - "$port" >/dev/null 2>&1 <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
    probe_server_pid=$!
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    if DROVER_METRICS_ADDR="0.0.0.0:$port" bash "$probe" /healthz 2>/dev/null \
        && ! DROVER_METRICS_ADDR="0.0.0.0:$port" bash "$probe" /readyz 2>/dev/null \
        && ! DROVER_METRICS_ADDR="127.0.0.1:1" bash "$probe" /healthz 2>/dev/null; then
        ok "docker: drover-probe passes on 200, fails on 503 and on a closed port"
    else
        fail "docker: drover-probe does not tell 200 from 503/closed"
    fi
    kill "$probe_server_pid" 2>/dev/null || true
    wait "$probe_server_pid" 2>/dev/null || true
    probe_server_pid=
fi

# ---- (e) the Dockerfile builds with the Makefile's `build` command -----------------------------
docker_cmd=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' deploy/docker/Dockerfile \
    | { grep -oE 'cargo build[^&;|]*' || true; } | head -1 | tr -s ' ' | sed 's/ *$//')
norm() { tr ' ' '\n' | { grep -v '^$' || true; } | sort | tr '\n' ' ' | sed 's/ $//'; }
if [[ -z $docker_cmd ]]; then
    fail "build: no 'cargo build' in deploy/docker/Dockerfile"
elif [[ ! -f Makefile ]]; then
    pending "build: Makefile not written yet; Dockerfile runs '$docker_cmd'"
else
    # What `make build` would run, variables expanded; the rule text if make cannot say.
    make_out=$(timeout 20 make --no-print-directory -n -B build 2>/dev/null) \
        || make_out=$(awk '/^build[[:space:]]*:/ {r=1; next} r && /^\t/ {print; next} r && !/^\t/ {r=0}' Makefile)
    make_cmds=$(grep -oE 'cargo build[^&;|]*' <<<"$make_out" | tr -s ' ' | sed 's/ *$//' || true)
    want=$(norm <<<"${docker_cmd#cargo build}")
    match=
    while IFS= read -r c; do
        [[ -n $c ]] && [[ $(norm <<<"${c#cargo build}") == "$want" ]] && match=$c
    done <<<"$make_cmds"
    if [[ -n $match ]]; then
        ok "build: Dockerfile and 'make build' both run '$docker_cmd'"
    elif [[ -z $make_cmds ]]; then
        fail "build: the Makefile's build target runs no 'cargo build' (Dockerfile: '$docker_cmd')"
    else
        fail "build: Dockerfile runs '$docker_cmd' but 'make build' runs '$(head -1 <<<"$make_cmds")'"
    fi
fi

if ((failures > 0)); then
    line FAIL "check-deploy: $failures check(s) failed"
    exit 1
fi
line ok "check-deploy: all checks passed"
