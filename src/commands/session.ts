import { fstatSync } from 'node:fs';
import { EXIT, MirrordCommand } from '../cli/base-command.js';
import { localPrivilegesProblem } from '../cli/mirror-settings.js';
import { sessionFlags, sessionSettingsOf } from '../cli/session-flags.js';
import { agentPlacer } from '../cli/target-flags.js';
import { runMirror } from '../session/mirror.js';

/** A JSON line on stdout: this command's whole output is for a program. */
function emit(event: object): void {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

/**
 * Whether stdin is a pipe (or a socket: Node's child_process makes its pipes so), which the
 * program that started this command holds open for as long as it wants the session: when it
 * ends (the editor closed, or killed) the session ends. A terminal or /dev/null says nothing of
 * the kind, and is not watched.
 */
function stdinIsPipe(): boolean {
  try {
    const stdin = fstatSync(0);
    return stdin.isFIFO() || stdin.isSocket();
  } catch {
    return false;
  }
}

export default class SessionCommand extends MirrordCommand {
  static override summary =
    'Start a session that a process started elsewhere joins (an editor’s debugger, a script).';
  static override description = [
    'Places the agent and starts the session like mirror, but starts no app: it prints, as one JSON line {"event":"join","env":{…}}, the variables a process must be started with to join the session (the layer to preload, the session’s socket and token, the features’ settings, and the target’s environment). Then it prints the session’s events as JSON lines (as mirror --json does; a fatal error is {"event":"error","message":…}) and keeps the session until the processes that joined it have exited (and none joined for 2 s after), until SIGINT or SIGTERM, or until its stdin, when that is a pipe, is closed.',
    'A process joins when it first uses the session: listens, opens one of the target’s files, or connects through it. Unlike mirror, the app’s localhost is this machine’s unless --localhost remote or mirrord.json says otherwise: debuggers speak to their debuggees over loopback, on ports known only once they run.',
  ].join('\n\n');
  static override usage = ['<%= command.id %> TARGET [FLAGS]'];
  static override examples = [
    '<%= config.bin %> session --deployment api -n staging',
    '<%= config.bin %> session --netns staging --no-outgoing',
  ];

  static override flags = sessionFlags;

  protected override reportErrorAsJson(line: string): void {
    emit({ event: 'error', message: line });
  }

  async run(): Promise<void> {
    const { flags } = await this.parse(SessionCommand);
    const settings = sessionSettingsOf(flags, 'local');
    const { config, target } = settings;
    const privilegesIssue = 'local' in target ? localPrivilegesProblem() : undefined;
    if (privilegesIssue) this.error(privilegesIssue, { exit: EXIT.failure });
    const abort = new AbortController();
    const interrupted = new Promise<void>((resolve) => {
      const stop = () => {
        abort.abort();
        resolve();
      };
      // `on`, not `once`: see the demo command.
      for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, stop);
      if (stdinIsPipe()) {
        process.stdin.on('end', stop).on('error', stop).resume();
      }
    });
    try {
      const placeAgent = await agentPlacer(target, flags, config, abort.signal);
      process.exitCode = await runMirror({
        placeAgent,
        join: (env) => emit({ event: 'join', env }),
        ports: settings.ports,
        ignorePorts: settings.ignorePorts,
        midStream: settings.midStream,
        appEnvironment: settings.appEnvironment,
        files: settings.files,
        outgoing: settings.outgoing,
        log: (line) => process.stderr.write(`${line}\n`),
        onEvent: emit,
        interrupted,
      });
    } finally {
      // The stdin watched above must not keep the CLI alive once the session is over, or failed.
      process.stdin.destroy();
    }
  }
}
