#!/bin/sh
# Lays out the runtime image on a Debian root with runtime-packages.txt installed: the
# non-root user, the model repository volume, the cache the binary unpacks the SDK into, and
# the example model repository made from plugins/examples. Run as root inside that root, by
# the Dockerfile and by scripts/check-deploy.sh, so both build the same image.
#
# usage: setup-runtime.sh EXAMPLES_SRC   (a folder of plugin files NAME.py)
set -eu
examples_src=$1

# A fixed uid/gid, so volumes prepared outside the container (a PVC, a bind mount) can be
# given to it, and Kubernetes' runAsNonRoot can check it.
groupadd --gid 10001 unimodel
useradd --uid 10001 --gid 10001 --home-dir /home/unimodel --create-home \
    --shell /usr/sbin/nologin unimodel

# /models: the model repository volume. /var/cache/unimodel: the SDK unpacked from the
# binary (UNIMODEL_CACHE_DIR), written on first start, so it must belong to the user.
install -d -o unimodel -g unimodel -m 0755 /models /var/cache/unimodel

# The examples as a model repository (one folder per model, holding plugin.py), for compose
# and for the chart's examples init container; read-only for the user.
for plugin in "$examples_src"/*.py; do
    name=$(basename "$plugin" .py)
    install -D -m 0644 "$plugin" "/opt/unimodel/examples/$name/plugin.py"
done

# The image's Python must run the worker runtime without a virtualenv: fail the build here,
# not the first model load.
python3 -c 'import sys, numpy, msgpack; assert sys.version_info >= (3, 10), sys.version'
