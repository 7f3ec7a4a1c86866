import { Flags } from '@oclif/core';
import { EXIT, MirrordCommand, UsageError } from '../cli/base-command.js';
import type { MirrorEvent } from '../features/mirror/cli.js';
import { runMirror } from '../session/mirror.js';
import { StatusLine } from '../cli/status-line.js';
import { SessionTerminal } from '../cli/terminal.js';
import {
  commandProblem,
  kubeAgentOptions,
  localPrivilegesProblem,
} from '../cli/mirror-settings.js';
import { sessionFlags, sessionSettingsOf } from '../cli/session-flags.js';
import { UNHOOKABLE_MEANS, commandHookability } from '../cli/unhookable.js';
import { agentPlacer } from '../cli/target-flags.js';

/**
 * The warning for a COMMAND the layer cannot hook (a Go program, a static binary), or undefined:
 * the session runs all the same, but without most of what the layer does.
 */
function unhookableWarning(file: string): string | undefined {
  const command = commandHookability(file);
  if (command?.reason === undefined) return undefined;
  return `mirrord: warning: COMMAND ${command.shown} is ${command.reason}: ${UNHOOKABLE_MEANS}`;
}

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
    ...sessionFlags,
    'dry-run': Flags.boolean({
      summary: 'Print the agent Job that would be created (YAML) and create nothing.',
      helpGroup: 'KUBERNETES',
    }),
    json: Flags.boolean({
      summary:
        'Print the session’s events (ready, listen, opened, closed, counters) as JSON lines on stdout.',
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
    const settings = sessionSettingsOf(flags);
    const { config, target, ports, ignorePorts } = settings;
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
    if ('kube' in target && flags['dry-run']) {
      const kube = await import('../platform/kube/place-kube-agent.js');
      process.stdout.write(
        await kube.agentJobYaml(kubeAgentOptions(target.kube, flags, config, abort.signal)),
      );
      return;
    }
    const placeAgent = await agentPlacer(target, flags, config, abort.signal);
    // Without --json, a live status at the bottom of the terminal; the app's output that shows
    // on that terminal comes through it, so that the status is redrawn below it.
    const terminal = new SessionTerminal();
    const live = terminal.live && !flags.json;
    // Before the session starts: the user may stop it and add --port.
    const warning = command[0] === undefined ? undefined : unhookableWarning(command[0]);
    if (warning) terminal.note(warning);
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
        midStream: settings.midStream,
        appEnvironment: settings.appEnvironment,
        files: settings.files,
        outgoing: settings.outgoing,
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
