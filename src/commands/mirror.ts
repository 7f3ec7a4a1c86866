import { Flags } from '@oclif/core';
import { EXIT, MirrordCommand, UsageError } from '../cli/base-command.js';
import { clusterFlags, kubeName } from '../cli/cluster-flags.js';
import { runMirror, type MirrorEvent } from '../session/mirror.js';
import { placeLocalAgent } from '../platform/local/agent-process.js';
import type { AgentPlacer } from '../platform/placed-agent.js';
import { StatusLine } from '../cli/status-line.js';
import { SessionTerminal } from '../cli/terminal.js';
import {
  CONFIG_FILE,
  KUBE_ONLY_KEYS,
  PORT_MAPPING,
  configFileName,
  loadMirrorConfig,
  portMappingOf,
  type PortMapping,
} from '../cli/config.js';
import {
  KUBE_ONLY_FLAGS,
  TARGET_FLAGS,
  commandProblem,
  kubeAgentOptions,
  localPrivilegesProblem,
  targetOf,
} from '../cli/mirror-settings.js';
import { AGENT_DEFAULTS, PULL_POLICIES } from '../platform/kube/agent-job.js';

/** --port REMOTE[:LOCAL]. */
const portMapping = Flags.custom<PortMapping>({
  parse: async (value, _context, flag) => {
    const mapping = portMappingOf(value);
    if (!mapping) throw new UsageError(`--${flag.name} "${value}" is not ${PORT_MAPPING}`);
    return mapping;
  },
});

const KUBE = 'KUBERNETES';
const AGENT = 'AGENT (KUBERNETES)';

export default class MirrorCommand extends MirrordCommand {
  static override summary = "Mirror a target's incoming TCP connections into a local process.";
  static override description =
    'Starts an agent on the target, runs COMMAND with the mirrord layer preloaded, and replays into it every connection that reaches the target on the ports COMMAND listens on. Exits with COMMAND’s exit code.\n\nTARGET is --pod, --deployment or --statefulset NAME (Kubernetes), or --pid PID or --netns NAME (this machine), or the same key in mirrord.json. Without COMMAND, --port replays into a service already running.';
  static override usage = [
    '<%= command.id %> TARGET [FLAGS] -- COMMAND [ARGS…]',
    '<%= command.id %> TARGET --port REMOTE[:LOCAL]… [FLAGS]',
  ];
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
      helpValue: 'PID',
      min: 1,
    }),
    netns: Flags.string({
      summary: 'Mirror this named network namespace (ip netns).',
      helpValue: 'NAME',
    }),
    pod: kubeName({
      summary: 'Mirror this pod.',
      helpValue: 'NAME',
      helpGroup: KUBE,
    }),
    deployment: kubeName({
      summary: 'Mirror the newest running, ready pod of this deployment.',
      helpValue: 'NAME',
      helpGroup: KUBE,
    }),
    statefulset: kubeName({
      summary: 'Mirror the newest running, ready pod of this statefulset.',
      helpValue: 'NAME',
      helpGroup: KUBE,
    }),
    container: kubeName({
      summary: 'The container to mirror (default: the first that is not a mesh sidecar).',
      helpValue: 'NAME',
      helpGroup: KUBE,
    }),
    namespace: kubeName({
      char: 'n',
      summary: "The target's namespace (default: the context's, else default).",
      helpValue: 'NAME',
      helpGroup: KUBE,
    }),
    ...clusterFlags(KUBE),
    'dry-run': Flags.boolean({
      summary: 'Print the agent Job that would be created (YAML) and create nothing.',
      helpGroup: KUBE,
    }),
    'agent-image': Flags.string({
      summary: 'The agent image (default: the agent image of this version).',
      helpValue: 'IMAGE',
      helpGroup: AGENT,
    }),
    'agent-pull-policy': Flags.option({
      summary: "The agent image's pull policy (default: the cluster's).",
      options: PULL_POLICIES,
      helpGroup: AGENT,
    })(),
    'agent-pull-secret': kubeName({
      summary: 'An image pull secret for the agent image (repeatable).',
      helpValue: 'NAME',
      multiple: true,
      helpGroup: AGENT,
    }),
    'agent-privileged': Flags.boolean({
      summary:
        'Run the agent privileged, where a cluster does not grant the capabilities it asks for by default.',
      helpGroup: AGENT,
    }),
    'agent-ttl': Flags.integer({
      summary: `Seconds Kubernetes keeps the finished agent Job (default: ${AGENT_DEFAULTS.ttlSeconds}).`,
      helpValue: 'SECONDS',
      min: 0,
      helpGroup: AGENT,
    }),
    'agent-idle-timeout': Flags.integer({
      summary: `Seconds the agent waits for its session before it exits (default: ${AGENT_DEFAULTS.idleTimeoutSeconds}).`,
      helpValue: 'SECONDS',
      min: 1,
      helpGroup: AGENT,
    }),
    'agent-startup-timeout': Flags.integer({
      summary: `Seconds to wait for the agent to start (default: ${AGENT_DEFAULTS.startupTimeoutSeconds}).`,
      helpValue: 'SECONDS',
      min: 1,
      helpGroup: AGENT,
    }),
    port: portMapping({
      summary: 'Mirror remote port REMOTE into local port LOCAL (default: the same).',
      multiple: true,
      helpValue: 'REMOTE[:LOCAL]',
    }),
    'ignore-port': Flags.integer({
      summary: 'Never mirror this remote port, even when COMMAND listens on it.',
      helpValue: 'PORT',
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
      helpValue: 'FILE',
    }),
  };

  /** With --json, a fatal error is an event too: `{"event":"error","message":…}`. */
  protected override reportErrorAsJson(line: string): void {
    const json = this.argv.indexOf('--json');
    const separator = this.argv.indexOf('--');
    if (json >= 0 && (separator < 0 || json < separator)) {
      process.stdout.write(`${JSON.stringify({ event: 'error', message: line })}\n`);
    }
  }

  async run(): Promise<void> {
    const { flags, argv } = await this.parse(MirrorCommand);
    // oclif reorders repeated values of a non-strict command: COMMAND is what follows `--`.
    const separator = this.argv.indexOf('--');
    const command = separator >= 0 ? this.argv.slice(separator + 1) : [];
    // What is neither a flag nor after `--` (oclif's argv holds both, those before `--` first).
    if (argv.length > command.length) {
      throw new UsageError(
        `unexpected argument "${String(argv[0])}": COMMAND and its arguments go after --, as in ${this.config.bin} mirror --netns staging -- node server.js`,
      );
    }
    const targetFlags = TARGET_FLAGS.filter((flag) => flags[flag] !== undefined);
    if (targetFlags.length > 1) {
      throw new UsageError(
        `give one target, not ${targetFlags.map((flag) => `--${flag}`).join(' and ')}`,
      );
    }
    const config = loadMirrorConfig(flags.config);
    // loadMirrorConfig checked every entry of `ports`.
    const mappings = flags.port ?? config.ports?.map((port) => portMappingOf(port)!) ?? [];
    const ports = new Map(mappings.map(({ remote, local }) => [remote, local]));
    const target = targetOf(flags) ?? targetOf(config);
    if (!target) {
      throw new UsageError(
        `no target: give --pod, --deployment, --statefulset, --pid or --netns (or the same key in ${CONFIG_FILE})`,
      );
    }
    if ('local' in target) {
      const given = flags as Record<string, unknown>;
      const kubeFlag = KUBE_ONLY_FLAGS.find((flag) => given[flag] !== undefined);
      if (kubeFlag) {
        throw new UsageError(
          `--${kubeFlag} applies to Kubernetes targets (--pod, --deployment, --statefulset), not to --pid or --netns`,
        );
      }
      // From a file that names no target: ignored here, as the flags would be, so refused.
      const kubeKey = KUBE_ONLY_KEYS.find((key) => config[key] !== undefined);
      if (kubeKey) {
        throw new UsageError(
          `${configFileName(flags.config)}: "${kubeKey}" applies to Kubernetes targets (pod, deployment, statefulset), not to --pid or --netns`,
        );
      }
    }
    // Found out before anything is placed next to the target, not once the agent is ready.
    const commandIssue = command[0] === undefined ? undefined : commandProblem(command[0]);
    if (commandIssue) throw new UsageError(commandIssue);
    if (command.length === 0 && ports.size === 0 && !flags['dry-run']) {
      throw new UsageError(
        'nothing to mirror into: give a COMMAND after --, or --port REMOTE:LOCAL',
      );
    }
    const privilegesIssue = 'local' in target ? localPrivilegesProblem() : undefined;
    if (privilegesIssue) this.error(privilegesIssue, { exit: EXIT.failure });
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
    const ignorePorts = new Set(flags['ignore-port'] ?? config.ignorePorts ?? []);
    // Without --json, a live status at the bottom of the terminal; the app's output that shows
    // on that terminal comes through it, so that the status is redrawn below it.
    const terminal = new SessionTerminal();
    const live = terminal.live && !flags.json;
    const status = new StatusLine({
      draw: live ? (render) => terminal.setStatus(render) : undefined,
      log: (line) => terminal.note(line),
      portsIgnored: ignorePorts,
    });
    const onEvent = (event: MirrorEvent): void => {
      if (flags.json) process.stdout.write(`${JSON.stringify(event)}\n`);
      status.record(event);
    };
    try {
      process.exitCode = await runMirror({
        placeAgent,
        command: command.length ? command : undefined,
        ports,
        ignorePorts,
        midStream: flags['mid-stream'] ?? config.midStream ?? false,
        log: (line) => terminal.note(line),
        onEvent,
        appOutput: live
          ? { ...terminal.appStreams(), write: (from, chunk) => terminal.writeApp(from, chunk) }
          : undefined,
        interrupted,
      });
    } finally {
      // runMirror returns once the app's output is all written: the last line comes after it,
      // and, on a failure, before the error, which then starts on a row of its own.
      terminal.finish(flags.json ? undefined : status.summary());
    }
  }
}
