{
  description = "deployer: a pull-based, Nix-style deployer (push, deploy-manifest, deployer-agent)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      build = pkgs: name: pkgs.rustPlatform.buildRustPackage {
        pname = name;
        version = "0.1.0";
        src = ./.;
        cargoLock.lockFile = ./Cargo.lock;
        cargoBuildFlags = [ "-p" name ];
        doCheck = false; # the tests need root, systemd and network namespaces: run scripts/test.sh
      };
    in
    {
      packages = forAll (pkgs: rec {
        deployer-agent = build pkgs "deployer-agent";
        deploy-manifest = build pkgs "deploy-manifest";
        push = build pkgs "push";
        default = deployer-agent;
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos-module ];
        services.deployer.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.deployer-agent;
      };
    };
}
