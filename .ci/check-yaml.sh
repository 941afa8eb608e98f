#!/usr/bin/env bash
# Parses every *.yaml / *.yml in the repository (outside target/, node_modules/
# and .git/; multi-document files too) with PyYAML, then checks:
#   - docker-compose.yml: services are exactly nats, redis, router, edge-1,
#     edge-2; every depends_on names a service; each service has image or build;
#   - other docker-compose*.yml files (cluster mode): the same, with their own services;
#   - every DAISI_WS_* variable named in docker-compose.yml, .env.example or a
#     Kubernetes manifest is a real config key (the binaries reject unknown ones);
#   - config files embedded in ConfigMaps only use keys of config/config.yaml.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "PyYAML missing; installing it with pip" >&2
  python3 -m pip install --quiet pyyaml >&2 || python3 -m pip install --quiet --user pyyaml >&2
fi

exec python3 - <<'EOF'
import os
import sys

import yaml

SKIP_DIRS = {"target", "node_modules", ".git"}
COMPOSE = "docker-compose.yml"
COMPOSE_SERVICES = {"nats", "redis", "router", "edge-1", "edge-2"}
CONFIG = "config/config.yaml"
ENV_EXAMPLE = ".env.example"


def yaml_files():
    for root, dirs, files in os.walk("."):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                yield os.path.relpath(os.path.join(root, name), ".")


def leaf_keys(node, prefix=""):
    keys = set()
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            keys |= leaf_keys(v, path + ".")
        else:
            keys.add(path)
    return keys


def known_env():
    with open(CONFIG) as f:
        config = yaml.safe_load(f)
    names = {"DAISI_WS_" + k.replace(".", "_").upper() for k in leaf_keys(config)}
    return leaf_keys(config), names | {"DAISI_WS_CONFIG"}


def bad_env(names, known):
    return sorted(n for n in names if n.startswith("DAISI_WS_") and n not in known)


def check_compose(doc, known):
    errors = []
    services = (doc or {}).get("services") or {}
    if set(services) != COMPOSE_SERVICES:
        errors.append(f"services are {sorted(services)}, expected {sorted(COMPOSE_SERVICES)}")
    env_names = set()
    for name, svc in services.items():
        svc = svc or {}
        if "image" not in svc and "build" not in svc:
            errors.append(f"service {name} has neither image nor build")
        deps = svc.get("depends_on") or []
        for dep in deps:  # list or mapping: iterating gives the names
            if dep not in services:
                errors.append(f"service {name} depends_on unknown service {dep}")
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            env_names |= set(env)
        else:
            env_names |= {str(e).split("=", 1)[0] for e in env}
    errors += [f"unknown config env var {n}" for n in bad_env(env_names, known)]
    return errors


def check_other_compose(doc, known):
    """Another compose file (cluster mode): the same checks but its own services."""
    errors = []
    services = (doc or {}).get("services") or {}
    if not services:
        errors.append("no services")
    env_names = set()
    for name, svc in services.items():
        svc = svc or {}
        if "image" not in svc and "build" not in svc:
            errors.append(f"service {name} has neither image nor build")
        for dep in svc.get("depends_on") or []:
            if dep not in services:
                errors.append(f"service {name} depends_on unknown service {dep}")
        env = svc.get("environment") or {}
        env_names |= set(env) if isinstance(env, dict) else {str(e).split("=", 1)[0] for e in env}
    errors += [f"unknown config env var {n}" for n in bad_env(env_names, known)]
    return errors


def check_k8s(doc, config_keys, known):
    errors = []
    if not isinstance(doc, dict) or "kind" not in doc:
        return errors
    env_names = set()
    if doc["kind"] == "Secret":
        env_names |= set(doc.get("stringData") or {}) | set(doc.get("data") or {})
    if doc["kind"] == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                try:
                    embedded = yaml.safe_load(text) or {}
                except yaml.YAMLError as e:
                    errors.append(f"ConfigMap key {key}: {e}")
                    continue
                if key == "config.yaml":
                    extra = sorted(leaf_keys(embedded) - config_keys)
                    errors += [f"ConfigMap config.yaml: unknown key {k}" for k in extra]
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        env_names |= {e.get("name", "") for e in c.get("env") or []}
    errors += [f"unknown config env var {n}" for n in bad_env(env_names, known)]
    return errors


def main():
    passed = failed = 0
    try:
        config_keys, known = known_env()
    except (OSError, yaml.YAMLError) as e:
        print(f"FAIL {CONFIG}: cannot read config keys: {e}")
        config_keys, known = set(), set()
        failed += 1

    def report(path, errors):
        nonlocal passed, failed
        if errors:
            failed += 1
            for e in errors:
                print(f"FAIL {path}: {e}")
        else:
            passed += 1
            print(f"ok   {path}")

    for path in yaml_files():
        try:
            with open(path) as f:
                docs = list(yaml.safe_load_all(f))
        except (OSError, yaml.YAMLError) as e:
            report(path, [" ".join(str(e).split())])
            continue
        errors = []
        if path == COMPOSE:
            errors += check_compose(docs[0] if docs else None, known)
        elif os.path.basename(path).startswith("docker-compose"):
            errors += check_other_compose(docs[0] if docs else None, known)
        for doc in docs:
            errors += check_k8s(doc, config_keys, known)
        report(path, errors)

    if not os.path.exists(COMPOSE):
        report(COMPOSE, ["missing"])

    if os.path.exists(ENV_EXAMPLE):
        names = set()
        with open(ENV_EXAMPLE) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    names.add(line.split("=", 1)[0].strip())
        report(f"{ENV_EXAMPLE} (env names)", [f"unknown config env var {n}" for n in bad_env(names, known)])

    print(f"yaml: {passed} passed, {failed} failed")
    return 1 if failed else 0


sys.exit(main())
EOF
