#!/usr/bin/env bash
# Refresh the browser libraries shipped in web/static/vendor/ from the npm
# registry, at the versions pinned in web/static/vendor/versions.txt. The
# files are committed: the app serves them itself (no CDN) and needs no
# build step. Run it after changing a version; review the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
vendor=web/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
while read -r package version files; do
  [[ -z "$package" || "$package" == \#* ]] && continue
  (cd "$work" && npm pack --silent "$package@$version" >/dev/null && mkdir -p "$package" && tar xzf "${package//@/}"*"-$version.tgz" -C "$package")
  mkdir -p "$vendor/$package"
  rm -f "$vendor/$package"/*
  for f in ${files//,/ }; do
    cp "$work/$package/package/$f" "$vendor/$package/"
  done
  echo "$package $version: $files"
done < "$vendor/versions.txt"
