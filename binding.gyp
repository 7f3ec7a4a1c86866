{
  "targets": [
    {
      # The BPF object and its skeleton (agent-bpf/.output/), which the addon embeds.
      "target_name": "mirrord_bpf",
      "type": "none",
      "actions": [
        {
          "action_name": "make_bpf",
          "inputs": [
            "agent-bpf/tap.bpf.c",
            "agent-bpf/tap.h",
            "agent-bpf/Makefile",
            "test/bpf/drop.bpf.c"
          ],
          "outputs": ["agent-bpf/.output/tap.skel.h"],
          "action": ["make", "-s", "--no-print-directory", "-C", "agent-bpf"]
        }
      ]
    },
    {
      "target_name": "mirrord_tap",
      "dependencies": ["mirrord_bpf"],
      "sources": ["agent-bpf/tap_addon.cc"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "agent-bpf",
        "agent-bpf/.output"
      ],
      "libraries": ["-lbpf", "-lelf", "-lz"],
      "defines": [
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        "NODE_ADDON_API_CPP_EXCEPTIONS_ALL",
        "NAPI_VERSION=8"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra"]
    },
    {
      # The files feature's one system call Node lacks (src/features/files/in_root.cc).
      "target_name": "mirrord_files",
      "sources": ["src/features/files/in_root.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NODE_ADDON_API_CPP_EXCEPTIONS", "NAPI_VERSION=8"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra"]
    },
    {
      # Outgoing connections leave from the target's network namespace: the agent's main
      # thread enters it (src/features/outgoing/netns.cc).
      "target_name": "mirrord_netns",
      "sources": ["src/features/outgoing/netns.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NODE_ADDON_API_CPP_EXCEPTIONS", "NAPI_VERSION=8"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra"]
    },
    {
      # Names resolved as the target resolves them: a program that enters the target's
      # namespaces and answers getaddrinfo queries (src/features/outgoing/resolver.c).
      "target_name": "mirrord_resolver",
      "type": "executable",
      "sources": ["src/features/outgoing/resolver.c"],
      "cflags": ["-Wall", "-Wextra", "-Werror", "-pthread"],
      "ldflags": ["-pthread"]
    }
  ]
}
