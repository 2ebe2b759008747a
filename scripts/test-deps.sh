#!/usr/bin/env bash
# System tools behind some of the suite's checks (Debian packages). Without them those tests
# skip, so this script says which, loudly, or installs them.
#
#   scripts/test-deps.sh --install   apt-get install the missing packages (sudo when not root)
#   scripts/test-deps.sh --check     name the checks that will be skipped and how to get them
#   --strict (or CI=true)            with --check: exit 1 when anything is missing
#
# `make test-deps` runs --install, `make test` runs --check before and after the suite, and
# .ci/run runs `make test-deps` first, so CI runs every check.
set -euo pipefail

mode=check
strict=0
[ "${CI:-}" = "true" ] && strict=1
for arg in "$@"; do
    case "$arg" in
        --install) mode=install ;;
        --check) mode=check ;;
        --strict) strict=1 ;;
        *) echo "usage: $0 [--install|--check] [--strict]" >&2; exit 2 ;;
    esac
done

postgres_lib="${POSTGRES_LIB:-/usr/lib/postgresql}"

# package | what the suite checks with it
packages=(postgresql chromium chromium-driver prometheus nginx-light wrk)
declare -A checks=(
    [postgresql]="PostgreSQL store, replica and dashboard-SQL tests (initdb, pg_ctl)"
    [chromium]="headless dashboard tests, tests/test_dashboard.py (chromium)"
    [chromium-driver]="headless dashboard tests, tests/test_dashboard.py (chromedriver)"
    [prometheus]="promtool check of deploy/prometheus, tests/test_deploy.py (promtool)"
    [nginx-light]="nginx -t of the scale profile's load balancer, tests/test_deploy.py (nginx)"
    [wrk]="bench.serving's wrk load driver, tests/test_bench_serving.py (wrk)"
)

present() {
    case "$1" in
        postgresql) compgen -G "$postgres_lib/*/bin/initdb" >/dev/null || command -v initdb >/dev/null ;;
        chromium) command -v chromium >/dev/null || command -v chromium-browser >/dev/null ;;
        chromium-driver) command -v chromedriver >/dev/null ;;
        prometheus) command -v promtool >/dev/null ;;
        nginx-light) command -v nginx >/dev/null ;;
        wrk) command -v wrk >/dev/null ;;
    esac
}

missing=()
for package in "${packages[@]}"; do
    present "$package" || missing+=("$package")
done

if [ "$mode" = install ]; then
    if ((${#missing[@]} == 0)); then
        echo "test-deps: all present (${packages[*]})"
        exit 0
    fi
    if ! command -v apt-get >/dev/null; then
        echo "test-deps: no apt-get here; install by hand: ${missing[*]}" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    echo "test-deps: installing ${missing[*]}"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi

if ((${#missing[@]} == 0)); then
    echo "test-deps: every system tool present; no check is skipped for want of one"
    exit 0
fi
{
    echo "================================================================================"
    echo "test-deps: THESE CHECKS ARE SKIPPED: their system tools are missing"
    for package in "${missing[@]}"; do
        echo "  - ${checks[$package]}: Debian package $package"
    done
    echo "Install them with:  make test-deps   (apt-get install ${missing[*]}; sudo when not root)"
    echo "================================================================================"
} >&2
((strict)) && exit 1
exit 0
