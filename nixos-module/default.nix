# services.deployer: the deployer agent on a NixOS host.
#
#   imports = [ ./nixos-module ];            # or the flake's nixosModules.default
#   services.deployer = {
#     enable = true;
#     store = "s3://my-bucket/deploy";
#     environmentFile = "/run/keys/deployer.env";   # AWS_* credentials, kept out of the store
#   };
#
# Defines deployer.service (a oneshot running `deployer-agent run --once`) and deployer.timer
# (1 minute after boot, then every `interval`), so `systemctl start deployer` deploys at once.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.deployer;
  inherit (lib) mkEnableOption mkIf mkOption types;

  proxyArgs = {
    none = [ ];
    caddy = [ "--proxy" "caddy" "--caddy-admin" cfg.caddyAdmin ];
    openresty = [ "--proxy" "openresty" "--nginx-config" cfg.openrestyConfig "--nginx-reload" cfg.openrestyReload ];
  }.${cfg.proxy};

  args = [
    "--store" cfg.store
    "--host" cfg.hostName
    "--state-dir" cfg.stateDir
    "--secrets-dir" cfg.secretsDir
  ] ++ proxyArgs
    ++ lib.optionals (cfg.trustedKeysFile != null) [ "--trusted-keys" cfg.trustedKeysFile ]
    ++ lib.optionals (cfg.nixTrustedKeysFile != null) [ "--nix-trusted-keys" cfg.nixTrustedKeysFile ]
    ++ [ "--history-keep" (toString cfg.historyKeep) ]
    ++ lib.optionals (cfg.notifyCommand != null) [ "--notify-command" cfg.notifyCommand ]
    ++ lib.optionals (cfg.notifyUrl != null) [ "--notify-url" cfg.notifyUrl ]
    ++ lib.optionals (cfg.metricsFile != null) [ "--metrics-file" cfg.metricsFile ]
    ++ lib.optionals (cfg.mode != null) [ "--mode" cfg.mode ]
    ++ cfg.extraArgs ++ [ "run" "--once" ];
in
{
  options.services.deployer = {
    enable = mkEnableOption "the deployer agent (pull-based deploys from a manifest in S3)";

    package = mkOption {
      type = types.package;
      defaultText = "pkgs.deployer-agent";
      default = pkgs.deployer-agent or (throw "services.deployer.package: set it, e.g. to the flake's packages.<system>.deployer-agent");
      description = "The package providing bin/deployer-agent.";
    };

    store = mkOption {
      type = types.str;
      example = "s3://my-bucket/deploy";
      description = "Where manifests and artifacts live: s3://bucket/prefix or file:///path.";
    };

    hostName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = "config.networking.hostName";
      description = "This host's name in the manifest's hosts lists.";
    };

    interval = mkOption {
      type = types.str;
      default = "5min";
      description = "Time between polls (systemd time span, used as OnUnitActiveSec).";
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/deployer";
      description = "state.json, fetched artifacts and logs.";
    };

    secretsDir = mkOption {
      type = types.str;
      default = "/var/lib/deployer-secrets";
      description = "Per-service env files (<service>.env, mode 600, owner root).";
    };

    proxy = mkOption {
      type = types.enum [ "caddy" "openresty" "none" ];
      default = "none";
      description = "Which reverse proxy the agent updates with each service's route.";
    };

    caddyAdmin = mkOption {
      type = types.str;
      default = "http://localhost:2019";
      description = "Caddy's admin API, with proxy = \"caddy\".";
    };

    openrestyConfig = mkOption {
      type = types.str;
      default = "/etc/nginx/conf.d/deployer.conf";
      description = "The generated nginx/OpenResty config file (include it from the main config), with proxy = \"openresty\".";
    };

    openrestyReload = mkOption {
      type = types.str;
      default = "nginx -s reload";
      description = "The command that reloads nginx/OpenResty after the new config passed `nginx -t`.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/deployer.env";
      description = "An env file for the agent (AWS credentials), read at runtime, never copied into the Nix store.";
    };

    trustedKeysFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/deployer/trusted-keys";
      description = "Accept only manifests signed by a key in this file (one NAME:BASE64 per line), never an older one than applied.";
    };

    nixTrustedKeysFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Import Nix closures only if their narinfos are signed by a key in this file (trusted-public-keys format).";
    };

    notifyCommand = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "logger -t deployer-event";
      description = "A shell command run for each event (deploy, rollback, failure, removal, rollout abort) with the event's JSON on its stdin; killed after 30 s, never delaying a deploy.";
    };

    notifyUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://hooks.example.com/deployer";
      description = "POST each event's JSON here (retried with backoff, never delaying a deploy). The Nix store is world-readable: a URL that carries a token belongs in environmentFile as DEPLOYER_NOTIFY_URL=... instead.";
    };

    historyKeep = mkOption {
      type = types.ints.positive;
      default = 200;
      description = "How many history records of this host the store keeps (deploy-manifest history); older ones are deleted.";
    };

    metricsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/prometheus-node-exporter-text-files/deployer.prom";
      description = "Write Prometheus metrics here after every run (node_exporter's textfile collector).";
    };

    mode = mkOption {
      type = types.nullOr (types.strMatching "[a-z0-9][a-z0-9_-]{0,62}");
      default = null;
      example = "regtest";
      description = "This host's mode: picks the command variant of infrastructure that declares variants (seed 001's networkMode).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More deployer-agent options, placed before `run --once`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [{
      assertion = cfg.store != "";
      message = "services.deployer.store: set the store URL (s3://bucket/prefix or file:///path).";
    }];

    systemd.services.deployer = {
      description = "deployer: converge this host to the manifest";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # journalctl: a failed deploy's log goes into the host's report.
      path = [ pkgs.nix config.systemd.package ] ++ lib.optional (cfg.proxy == "openresty") pkgs.openresty;
      serviceConfig = {
        Type = "oneshot";
        ExecStart = lib.escapeShellArgs ([ "${cfg.package}/bin/deployer-agent" ] ++ args);
        TimeoutStartSec = "30min";
      } // lib.optionalAttrs (cfg.environmentFile != null) {
        EnvironmentFile = cfg.environmentFile;
      };
    };

    systemd.timers.deployer = {
      description = "deployer: poll the manifest every ${cfg.interval}";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnBootSec = "1min";
        OnUnitActiveSec = cfg.interval;
        RandomizedDelaySec = "15s";
        Persistent = true;
        Unit = "deployer.service";
      };
    };

    systemd.tmpfiles.rules = [
      "d ${cfg.stateDir} 0755 root root -"
      "d ${cfg.secretsDir} 0700 root root -"
    ];
  };
}
