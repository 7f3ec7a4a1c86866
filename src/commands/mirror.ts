import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import { clusterFlags } from '../cli/cluster-flags.js';
import { runMirror, type MirrorEvent } from '../session/mirror.js';
import { placeLocalAgent } from '../platform/local/agent-process.js';
import type { AgentPlacer } from '../platform/placed-agent.js';
import { StatusLine } from '../cli/status-line.js';
import { CONFIG_FILE, isKubeName, loadMirrorConfig } from '../cli/config.js';
import {
  KUBE_ONLY_FLAGS,
  TARGET_FLAGS,
  kubeAgentOptions,
  parsePortMapping,
  targetOf,
} from '../cli/mirror-settings.js';

const kubeName = Flags.custom<string>({
  parse: async (value) => {
    if (!isKubeName(value)) {
      throw new Error(
        `"${value}" is not a Kubernetes name (lower case letters, digits, "-" and ".")`,
      );
    }
    return value;
  },
});

const KUBE = 'KUBERNETES';
const AGENT = 'AGENT (KUBERNETES)';

export default class MirrorCommand extends MirrordCommand {
  static override summary = "Mirror a target's incoming TCP connections into a local process.";
  static override description =
    'Starts an agent on the target, runs COMMAND with the mirrord layer preloaded, and replays into it every connection that reaches the target on the ports COMMAND listens on. Exits with COMMAND’s exit code.';
  static override examples = [
    '<%= config.bin %> mirror --pod api-7f9 -- node server.js',
    '<%= config.bin %> mirror --deployment api -n staging --container api -- node server.js',
    '<%= config.bin %> mirror --deployment api --dry-run',
    '<%= config.bin %> mirror --netns staging -- node server.js',
    '<%= config.bin %> mirror --pid 4242 --port 80:8080',
  ];
  // COMMAND's own arguments follow `--` and are not mirrord's flags.
  static override strict = false;

  static override flags = {
    pid: Flags.integer({
      summary: 'Mirror the network namespace of this local process.',
      min: 1,
    }),
    netns: Flags.string({
      summary: 'Mirror this named network namespace (ip netns).',
    }),
    pod: kubeName({
      summary: 'Mirror this pod.',
      helpGroup: KUBE,
    }),
    deployment: kubeName({
      summary: 'Mirror the newest running, ready pod of this deployment.',
      helpGroup: KUBE,
    }),
    statefulset: kubeName({
      summary: 'Mirror the newest running, ready pod of this statefulset.',
      helpGroup: KUBE,
    }),
    container: kubeName({
      summary: 'The container to mirror (default: the first that is not a mesh sidecar).',
      helpGroup: KUBE,
    }),
    namespace: kubeName({
      char: 'n',
      summary: "The target's namespace (default: the context's, else default).",
      helpGroup: KUBE,
    }),
    ...clusterFlags(KUBE),
    'dry-run': Flags.boolean({
      summary: 'Print the agent Job that would be created (YAML) and create nothing.',
      helpGroup: KUBE,
    }),
    'agent-image': Flags.string({
      summary: 'The agent image (default: the agent image of this version).',
      helpGroup: AGENT,
    }),
    'agent-pull-policy': Flags.option({
      summary: "The agent image's pull policy (default: the cluster's).",
      options: ['Always', 'IfNotPresent', 'Never'] as const,
      helpGroup: AGENT,
    })(),
    'agent-pull-secret': kubeName({
      summary: 'An image pull secret for the agent image (repeatable).',
      multiple: true,
      helpGroup: AGENT,
    }),
    'agent-capabilities': Flags.boolean({
      summary: 'Run the agent with just the capabilities it needs instead of privileged.',
      allowNo: true,
      helpGroup: AGENT,
    }),
    'agent-ttl': Flags.integer({
      summary: 'Seconds Kubernetes keeps the finished agent Job (default: 60).',
      min: 0,
      helpGroup: AGENT,
    }),
    'agent-idle-timeout': Flags.integer({
      summary: 'Seconds the agent waits for its session before it exits (default: 30).',
      min: 1,
      helpGroup: AGENT,
    }),
    'agent-startup-timeout': Flags.integer({
      summary: 'Seconds to wait for the agent to start (default: 60).',
      min: 1,
      helpGroup: AGENT,
    }),
    port: Flags.string({
      summary: 'Mirror remote port REMOTE into local port LOCAL (default: the same).',
      multiple: true,
      helpValue: 'REMOTE[:LOCAL]',
    }),
    'ignore-port': Flags.integer({
      summary: 'Never mirror this remote port, even when COMMAND listens on it.',
      multiple: true,
      min: 1,
      max: 65535,
    }),
    'mid-stream': Flags.boolean({
      summary: 'Also replay connections that were already open when mirroring started.',
      allowNo: true,
    }),
    json: Flags.boolean({
      summary:
        'Print the session’s events (ready, listen, opened, closed, counters) as JSON lines on stdout.',
    }),
    config: Flags.string({
      summary: `Settings file (default: ./${CONFIG_FILE} when present); flags win over it.`,
    }),
  };

  async run(): Promise<void> {
    const { flags } = await this.parse(MirrorCommand);
    // oclif reorders repeated values of a non-strict command: COMMAND is what follows `--`.
    const separator = this.argv.indexOf('--');
    const command = separator >= 0 ? this.argv.slice(separator + 1) : [];
    const targetFlags = TARGET_FLAGS.filter((flag) => flags[flag] !== undefined);
    if (targetFlags.length > 1) {
      this.error(`give one target, not ${targetFlags.map((flag) => `--${flag}`).join(' and ')}`, {
        exit: 2,
      });
    }
    const config = loadMirrorConfig(flags.config);
    const ports = new Map((flags.port ?? config.ports ?? []).map(parsePortMapping));
    const target = targetOf(flags) ?? targetOf(config);
    if (!target) {
      this.error(
        'no target: give --pod, --deployment, --statefulset, --pid or --netns (or the same key in mirrord.json)',
        { exit: 2 },
      );
    }
    if ('local' in target) {
      const kubeFlag = KUBE_ONLY_FLAGS.find((flag) => flags[flag] !== undefined);
      if (kubeFlag) {
        this.error(
          `--${kubeFlag} applies to Kubernetes targets (--pod, --deployment, --statefulset), not to --pid or --netns`,
          { exit: 2 },
        );
      }
    }
    const abort = new AbortController();
    const interrupted = new Promise<void>((resolve) => {
      // `on`, not `once`: see the demo command. SIGHUP: the terminal went away.
      for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
        process.on(signal, () => {
          abort.abort();
          resolve();
        });
      }
    });
    let placeAgent: AgentPlacer;
    if ('kube' in target) {
      const kube = await import('../platform/kube/place-kube-agent.js');
      const options = kubeAgentOptions(target.kube, flags, config, abort.signal);
      if (flags['dry-run']) {
        process.stdout.write(await kube.agentJobYaml(options));
        return;
      }
      placeAgent = kube.placeKubeAgent(options);
    } else {
      placeAgent = placeLocalAgent(target.local);
    }
    if (command.length === 0 && ports.size === 0) {
      this.error('nothing to mirror into: give a COMMAND after --, or --port REMOTE:LOCAL', {
        exit: 2,
      });
    }
    const status = new StatusLine();
    const onEvent = flags.json
      ? (event: MirrorEvent) => process.stdout.write(`${JSON.stringify(event)}\n`)
      : (event: MirrorEvent) => {
          if (event.event === 'counters') status.update(event);
        };
    process.exitCode = await runMirror({
      placeAgent,
      command: command.length ? command : undefined,
      ports,
      ignorePorts: new Set(flags['ignore-port'] ?? config.ignorePorts ?? []),
      midStream: flags['mid-stream'] ?? config.midStream ?? false,
      log: (line) => {
        status.clear();
        this.logToStderr(line);
      },
      onEvent,
      interrupted,
    }).then((code) => {
      status.finish();
      return code;
    });
  }
}
