# A stand-in for the NixOS module system, just enough to evaluate services.deployer without
# nixpkgs: options with types and defaults, the user's settings checked against the types and
# merged over the defaults, mkIf, assertions. The tests run:
#   nix-instantiate --eval --strict --json nixos-module/tests/eval.nix --arg settings '{ … }'
{ settings ? { enable = true; store = "s3://bucket/prefix"; }, hostName ? "biz" }:
let
  lib = rec {
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = what: mkOption { type = types.bool; default = false; description = "Whether to enable ${what}."; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkDefault = v: v;
    optionalAttrs = cond: attrs: if cond then attrs else { };
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    escapeShellArg = arg: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg) + "'";
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
    types = {
      bool = { name = "bool"; check = builtins.isBool; };
      str = { name = "str"; check = builtins.isString; };
      package = { name = "package"; check = v: builtins.isString v || builtins.isAttrs v; };
      enum = values: { name = "one of ${builtins.toJSON values}"; check = v: builtins.elem v values; };
      nullOr = t: { name = "null or ${t.name}"; check = v: v == null || t.check v; };
      listOf = t: { name = "list of ${t.name}"; check = v: builtins.isList v && builtins.all t.check v; };
      ints.positive = { name = "positive integer"; check = v: builtins.isInt v && v > 0; };
      strMatching = re: { name = "string matching ${re}"; check = v: builtins.isString v && builtins.match re v != null; };
    };
  };
  pkgs = {
    deployer-agent = "/nix/store/00000000000000000000000000000000-deployer-agent";
    nix = "/nix/store/00000000000000000000000000000000-nix";
    openresty = "/nix/store/00000000000000000000000000000000-openresty";
  };
  module = import ../default.nix;
  evalWith = cfg: module {
    inherit lib pkgs;
    config = {
      services.deployer = cfg;
      networking.hostName = hostName;
      systemd.package = "/nix/store/00000000000000000000000000000000-systemd";
    };
  };
  declared = (evalWith { }).options.services.deployer;
  unknown = builtins.filter (n: !(declared ? ${n})) (builtins.attrNames settings);
  checked = builtins.mapAttrs
    (name: value:
      if declared.${name}.type.check value then value
      else throw "services.deployer.${name}: ${builtins.toJSON value} is not ${declared.${name}.type.name}")
    settings;
  defaults = builtins.mapAttrs (_: o: o.default) (lib.optionalAttrs true (builtins.removeAttrs declared
    (builtins.filter (n: !(declared.${n} ? default)) (builtins.attrNames declared))));
  missing = builtins.filter (n: !(declared.${n} ? default) && !(settings ? ${n})) (builtins.attrNames declared);
  cfg = defaults // checked;
  result = evalWith cfg;
  config = if result.config.condition then result.config.content else { };
in
if unknown != [ ] then throw "unknown options: services.deployer.${builtins.concatStringsSep ", " unknown}"
else if result.config.condition && missing != [ ] then throw "options without a value: ${builtins.concatStringsSep ", " missing}"
else {
  options = builtins.attrNames declared;
  defaults = defaults;
  enabled = result.config.condition;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) (config.assertions or [ ]));
  config = builtins.removeAttrs config [ "assertions" ];
}
