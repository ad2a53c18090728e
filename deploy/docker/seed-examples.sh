#!/bin/sh
# Copies the image's example models (/opt/unimodel/examples: plugins/examples laid out as a
# model repository) into a model repository, skipping every model folder that is already
# there, so it never overwrites a model of yours and can run on every start. Used by the
# compose file's models-init service and the Helm chart's init container.
#
# usage: seed-examples.sh REPOSITORY
set -eu
repository=$1
for model in /opt/unimodel/examples/*/; do
    name=$(basename "$model")
    if [ -e "$repository/$name" ]; then
        echo "seed-examples: $name is already in $repository; left as it is"
    else
        cp -R "$model" "$repository/$name"
        echo "seed-examples: copied $name into $repository"
    fi
done
