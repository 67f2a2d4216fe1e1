#!/usr/bin/env bash
# Checks every manifest in deploy/k8s against the Kubernetes API schemas
# (PyPI kubernetes-validate, which bundles them: no cluster, no network
# beyond the package index), strict about unknown fields.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import kubernetes_validate' 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet 'kubernetes-validate>=1.28'
fi
version=$(.venv/bin/python -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
.venv/bin/kubernetes-validate --strict --kubernetes-version "$version" deploy/k8s/*.yaml
echo "deploy/k8s: every manifest valid against Kubernetes $version"
