#!/usr/bin/env bash
# Fills .image-wheels/ (part of the image's build context) with every Python wheel the image
# needs, downloaded with the host's own pip: the image build then installs them without
# reaching PyPI (no registry, no proxy certificate inside the build). The wheels are chosen
# for the image, not the host: CPython 3.11 on x86_64 glibc (Debian 12). Nothing is done when
# the dependencies in pyproject.toml have not changed since the last run.
# Argument: the Python whose pip downloads (default python3).
set -euo pipefail
python=${1:-python3}
dir=.image-wheels
mkdir -p "$dir"
"$python" - >"$dir/requirements.txt.new" <<'PY'
import tomllib
with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
print("\n".join(project["dependencies"]))
# The image's builder stage compiles the .proto files and the service's wheel with these.
print("grpcio-tools\nsetuptools>=68\nwheel")
PY
if cmp -s "$dir/requirements.txt.new" "$dir/requirements.txt" && ls "$dir"/*.whl >/dev/null 2>&1; then
  rm "$dir/requirements.txt.new"
  exit 0
fi
mv "$dir/requirements.txt.new" "$dir/requirements.txt"
rm -f "$dir"/*.whl
echo "downloading the image's Python wheels into $dir"
"$python" -m pip download -q --dest "$dir" --only-binary=:all: \
  --implementation cp --python-version 3.11 \
  $(for p in manylinux2014 manylinux_2_{17,24,27,28,31,34,36}; do echo --platform ${p}_x86_64; done) \
  --platform any \
  -r "$dir/requirements.txt"
