# The mirrord agent image: what the agent Job runs (`mirrord agent --container-id ...`) on the
# target's node. Build from the repository root:
#   docker build -f docker/agent.Dockerfile -t ghcr.io/mirrord-dev/mirrord-agent:0.1.0 .
# The build context is filtered by the root .dockerignore.

FROM node:20-bookworm AS build
RUN apt-get update \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    clang llvm libbpf-dev libelf-dev zlib1g-dev bpftool make g++ pkg-config python3 \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The image's own Node headers, so node-gyp needs no download.
ENV npm_config_nodedir=/usr/local
COPY package.json package-lock.json ./
# Dependencies' install scripts stay off, as package.json's allowScripts says; the addon is
# built explicitly below.
RUN npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
COPY tsconfig.json binding.gyp ./
COPY agent-bpf/ agent-bpf/
# agent-bpf/Makefile also builds the test-only drop program from here.
COPY test/bpf/ test/bpf/
COPY bin/ bin/
COPY src/ src/
# The agent's part of `npm run build`: the BPF object and its skeleton, the addon that embeds
# them, the TypeScript and the oclif manifest (not the layer, which only the CLI side preloads).
RUN make -s -C agent-bpf \
  && npx node-gyp rebuild --silent \
  && npx tsc -p tsconfig.json \
  && OCLIF_SKIP_NEW_VERSION_CHECK=true npx oclif manifest \
  && npm prune --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error

FROM node:20-bookworm-slim
RUN apt-get update \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libbpf1 libelf1 zlib1g \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mirrord
COPY --from=build /src/package.json /src/oclif.manifest.json ./
COPY --from=build /src/node_modules/ node_modules/
COPY --from=build /src/bin/ bin/
COPY --from=build /src/dist/ dist/
# The addon embeds the BPF object (bpftool skeleton): agent-bpf/.output is not needed here.
COPY --from=build /src/build/Release/mirrord_tap.node build/Release/
# The files feature's openat2 (src/features/files/in_root.cc).
COPY --from=build /src/build/Release/mirrord_files.node build/Release/
# Outgoing connections: the addon that enters the target's network namespace, and the program
# that resolves names in the target's namespaces (src/features/outgoing/).
COPY --from=build /src/build/Release/mirrord_netns.node /src/build/Release/mirrord_resolver build/Release/
# The Job's command is `mirrord agent ...`: this puts `mirrord` on PATH.
COPY docker/mirrord /usr/local/bin/mirrord
ENTRYPOINT ["mirrord"]
