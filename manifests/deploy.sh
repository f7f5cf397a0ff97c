#!/usr/bin/env bash
# Deploy flyswarm to Fly.io: manifests/deploy.sh staging|production
#
# What it does (the seed orchestrator's manual steps, made repeatable):
#   1. create the two apps if they are missing: the control plane (API, controller and the model
#      gateway) and the image-only agent app;
#   2. set secrets, all on the CONTROLLER app, staged so the deploy below applies them: FLY_API_TOKEN,
#      REDIS_URL, API_TOKENS, ANTHROPIC_API_KEY (read by the gateway only: agents reach the model
#      through it with their session's token). Agents get no Redis address: their state goes
#      through the gateway too. The agent app gets no secret at all; a key left there by an older deploy is removed;
#   3. build and push the agent image to registry.fly.io/<agent app>:<label> (no machine is created);
#   4. deploy the control plane, pointing it at that agent app and image.
#
# Required environment: FLY_API_TOKEN (flyctl's token), REDIS_URL, API_TOKENS, ANTHROPIC_API_KEY.
# Optional: FLYSWARM_CONTROLLER_APP, FLYSWARM_AGENT_APP (default flyswarm[-staging],
# flyswarm-agents[-staging]), FLYSWARM_AGENT_APPS (several agent apps, comma-separated: Fly limits
# creates per app, so N apps create N machines/s; every one is created, the image is pushed to the
# first and pulled from there by all, the controller gets FLYSWARM_FLY_APPS; default: the one
# FLYSWARM_AGENT_APP), FLY_ORG (personal), FLYSWARM_IMAGE_LABEL (git commit), FLYSWARM_HA
# (false for staging, true for production), FLYSWARM_CONTROLLER_FLY_API_TOKEN (the token the
# controller itself uses; default FLY_API_TOKEN — prefer `flyctl tokens create deploy -a <agent app>`),
# FLYCTL (path of flyctl), DRY_RUN=1 (print the commands, run nothing).
#
# Secret values are read from the environment, handed to flyctl on stdin, and never printed.
set -euo pipefail

usage() {
  echo "usage: manifests/deploy.sh staging|production" >&2
  exit 2
}

[[ $# -eq 1 ]] || usage
environment=$1
case "$environment" in
  staging) suffix="-staging" ha_default=false ;;
  production) suffix="" ha_default=true ;;
  *) usage ;;
esac

missing=()
for name in FLY_API_TOKEN REDIS_URL API_TOKENS ANTHROPIC_API_KEY; do
  [[ -n "${!name:-}" ]] || missing+=("$name")
done
if ((${#missing[@]})); then
  echo "deploy.sh: missing required environment variable(s): ${missing[*]}" >&2
  echo "  set them in the environment (CI: repository or environment secrets); see manifests/DEPLOY.md" >&2
  exit 1
fi

dry_run=${DRY_RUN:-0}
flyctl=${FLYCTL:-$(command -v flyctl || command -v fly || true)}
if [[ -z "$flyctl" && "$dry_run" != 1 ]]; then
  echo "deploy.sh: flyctl not found on PATH (https://fly.io/docs/flyctl/install/)" >&2
  exit 1
fi
flyctl=${flyctl:-flyctl}

cd "$(dirname "$0")/.."

controller_app=${FLYSWARM_CONTROLLER_APP:-flyswarm${suffix}}
agent_app=${FLYSWARM_AGENT_APP:-flyswarm-agents${suffix}}
# Several agent apps spread machine creates (Fly limits them per app); the first holds the image.
IFS=',' read -r -a agent_apps <<<"${FLYSWARM_AGENT_APPS:-$agent_app}"
apps_clean=()
for app in "${agent_apps[@]}"; do
  app=${app//[[:space:]]/}
  [[ -n "$app" ]] || continue
  if ! [[ "$app" =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]]; then
    echo "deploy.sh: FLYSWARM_AGENT_APPS: '$app' is not a Fly app name (lowercase letters, digits, dashes)" >&2
    exit 1
  fi
  apps_clean+=("$app")
done
agent_apps=("${apps_clean[@]}")
if ((${#agent_apps[@]} == 0)); then
  echo "deploy.sh: FLYSWARM_AGENT_APPS names no app" >&2
  exit 1
fi
agent_app=${agent_apps[0]}
agent_apps_csv=$(IFS=','; echo "${agent_apps[*]}")
org=${FLY_ORG:-personal}
ha=${FLYSWARM_HA:-$ha_default}
label=${FLYSWARM_IMAGE_LABEL:-$(git rev-parse --short=12 HEAD 2>/dev/null || date -u +%Y%m%d%H%M%S)}
label="${environment}-${label}"
image="registry.fly.io/${agent_app}:${label}"
controller_token=${FLYSWARM_CONTROLLER_FLY_API_TOKEN:-$FLY_API_TOKEN}
export FLY_API_TOKEN # flyctl authenticates with it

# Run a command (its arguments never hold a secret), or only show it with DRY_RUN=1.
run() {
  echo "+ $*"
  if [[ "$dry_run" != 1 ]]; then
    "$@"
  fi
}

# flyctl's import format strips quotes and comments, so refuse values it could alter rather than
# store a different secret than the one given.
check_secret_value() {
  local name=$1 value=$2
  case "$value" in
    *[[:space:]\"\'\#\$\\\`]*)
      echo "deploy.sh: $name contains whitespace, quotes, #, \$, \\ or a backtick, which" \
        "'flyctl secrets import' would alter; set it by hand: flyctl secrets set -a <app> $name=..." >&2
      exit 1
      ;;
  esac
}

# Set secrets NAME=VALUE read from this shell's variables, through stdin (never argv, never echoed).
#   import_secrets <app> <stage:true|false> NAME=VARIABLE...
import_secrets() {
  local app=$1 stage=$2
  shift 2
  local pairs=() names=() spec name variable
  for spec in "$@"; do
    name=${spec%%=*}
    variable=${spec#*=}
    check_secret_value "$name" "${!variable}"
    pairs+=("$name=${!variable}")
    names+=("$name")
  done
  local flags=(secrets import --app "$app")
  [[ "$stage" == true ]] && flags+=(--stage)
  echo "+ $flyctl ${flags[*]}   (secrets on stdin: ${names[*]})"
  if [[ "$dry_run" != 1 ]]; then
    printf '%s\n' "${pairs[@]}" | "$flyctl" "${flags[@]}"
  fi
}

ensure_app() {
  local app=$1
  if [[ "$dry_run" != 1 ]] && "$flyctl" status --app "$app" >/dev/null 2>&1; then
    echo "app $app exists"
  else
    run "$flyctl" apps create "$app" --org "$org" || {
      # A concurrent run, or an app `flyctl status` could not read: only fail if it is still missing.
      [[ "$dry_run" == 1 ]] || "$flyctl" status --app "$app" >/dev/null 2>&1
    }
  fi
}

# Check every value before changing anything.
for name in ANTHROPIC_API_KEY REDIS_URL API_TOKENS; do
  check_secret_value "$name" "${!name:-}"
done
check_secret_value FLYSWARM_CONTROLLER_FLY_API_TOKEN "$controller_token"

echo "== flyswarm $environment: control plane $controller_app, agents $agent_apps_csv, image $image"

for app in "${agent_apps[@]}"; do
  ensure_app "$app"
done
ensure_app "$controller_app"

# The key of an older deploy must not stay where every agent (and every tool it runs) can read it.
for app in "${agent_apps[@]}"; do
  if [[ "$dry_run" == 1 ]] || "$flyctl" secrets list --app "$app" 2>/dev/null | grep -q '^ANTHROPIC_API_KEY\b'; then
    run "$flyctl" secrets unset ANTHROPIC_API_KEY --app "$app"
  fi
done
controller_secrets=(
  FLY_API_TOKEN=controller_token REDIS_URL=REDIS_URL API_TOKENS=API_TOKENS ANTHROPIC_API_KEY=ANTHROPIC_API_KEY
)
import_secrets "$controller_app" true "${controller_secrets[@]}"

# Build on Fly's remote builder and push; --build-only creates no machine in the agent app.
run "$flyctl" deploy . --config manifests/fly.agent.toml --app "$agent_app" \
  --build-only --push --remote-only --image-label "$label"

run "$flyctl" deploy . --config manifests/fly.controller.toml --app "$controller_app" \
  --remote-only --ha="$ha" \
  --env "FLY_APP_NAME=$agent_app" --env "FLYSWARM_FLY_APPS=$agent_apps_csv" --env "FLY_AGENT_IMAGE=$image" \
  --env "FLYSWARM_AGENT_GATEWAY_URL=http://gateway.process.${controller_app}.internal:8082"

echo "== deployed: https://${controller_app}.fly.dev"
echo "   curl https://${controller_app}.fly.dev/health"
echo "   FLYSWARM_URL=https://${controller_app}.fly.dev FLYSWARM_TOKEN=<one of API_TOKENS> flyswarm get sessions"
