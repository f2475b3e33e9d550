#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks run as real peers:
# nginx (Range reference; its stream module for the PROXY protocol), wrk (load generator),
# ffmpeg (client-side decoding), opus-tools (opusdec: libopusfile, a reference decoder for
# chained Ogg Opus; opusinfo, a stream validator), chromium (playback in a real browser, driven by Playwright),
# prometheus and promtool (the deploy/ dashboards and alert rules).
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
# The stream module: tests/test_proxies.py runs nginx with `proxy_protocol on`.
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
command -v opusdec >/dev/null 2>&1 || need+=(opus-tools)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
