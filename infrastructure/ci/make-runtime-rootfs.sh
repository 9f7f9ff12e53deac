#!/bin/sh
# Assembles a distroless-like root filesystem in $1 from the files of the
# Debian packages our binaries link against (glibc, libgcc, libstdc++, as distroless cc has) plus the few
# files distroless ships: passwd/group with nonroot 65532, nsswitch.conf,
# a CA bundle, /tmp. Runs inside a debian:<release>-slim build stage (trixie
# for cc-debian13).
set -eu
out=$1
mkdir -p "$out"
# Debian (12 and 13) merges /usr: /lib, /bin, ... are links into it, so the targets
# must exist before the links are unpacked.
for dir in bin lib lib64 sbin; do mkdir -p "$out/usr/$dir"; done
# Every file (and symlink) of the packages, keeping Debian's merged-/usr links.
dpkg -L libc6 libgcc-s1 libstdc++6 netbase tzdata 2>/dev/null \
  | while read -r path; do [ -f "$path" ] || [ -L "$path" ] && echo "$path"; done \
  | grep -v -E '^/usr/share/(doc|man|info|lintian)/' \
  | tar -cf - --no-recursion -T - | tar -xf - -C "$out"
for link in bin lib lib64 sbin; do
  if [ -L "/$link" ] && [ ! -e "$out/$link" ]; then cp -P "/$link" "$out/$link"; fi
done
mkdir -p "$out/etc/ssl/certs" "$out/home/nonroot" "$out/tmp" "$out/root"
cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$out/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$out/etc/nsswitch.conf"
chown 65532:65532 "$out/home/nonroot"
chmod 1777 "$out/tmp"
chmod 700 "$out/root"
