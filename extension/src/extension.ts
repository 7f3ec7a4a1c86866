/**
 * The mirrord extension: a status bar switch, the workspace's target, and the debugger's
 * process run under a `mirrord session` of the CLI (see debug.ts). Each error the CLI gives is
 * a notification with its line; everything it says is in the "mirrord" output channel.
 */
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as vscode from 'vscode';
import { findCli, run, startFailure, type Cli } from './cli';
import { MirrordDebug } from './debug';
import { MirrordSession } from './session';
import { StatusItem } from './status';
import { pickTarget, rememberedTarget, type Target } from './targets';

const ENABLED_KEY = 'mirrord.enabled';

let debug: MirrordDebug | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const state = context.workspaceState;
  const output = vscode.window.createOutputChannel('mirrord');
  const status = new StatusItem();
  const cli = () => findCli(vscode.workspace.getConfiguration('mirrord').get('cliPath', ''));
  const cwd = () => vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  const enabled = () => state.get<boolean>(ENABLED_KEY, false);
  const tell = (line: string) => {
    output.appendLine(`error: ${line}`);
    void vscode.window.showErrorMessage(`mirrord: ${line}`);
  };
  const showIdle = () => status.idle(enabled(), rememberedTarget(state)?.label);
  const selectTarget = async () => {
    const target = await pickTarget(cli(), cwd(), state, tell);
    showIdle();
    return target;
  };

  const startSession = (target: Target, folder: string | undefined) => {
    output.appendLine(`mirrord session ${target.args.join(' ')}`);
    status.starting(target.label);
    const session = new MirrordSession(cli(), target.args, folder ?? cwd());
    session.on('line', (line) => output.appendLine(line));
    session.on('error', tell);
    session.on('counters', (counters) => status.counters(counters));
    session.on('end', (code) => {
      output.appendLine(`mirrord session ended (exit code ${code})`);
      showIdle();
    });
    return session;
  };

  debug = new MirrordDebug({
    enabled,
    target: async () => rememberedTarget(state) ?? (await selectTarget()),
    startSession,
  });

  context.subscriptions.push(
    output,
    status,
    debug,
    vscode.commands.registerCommand('mirrord.toggle', async () => {
      const on = !enabled();
      await state.update(ENABLED_KEY, on);
      showIdle();
      if (!on) await debug?.stopAll();
      else if (!rememberedTarget(state)) await selectTarget();
    }),
    vscode.commands.registerCommand('mirrord.selectTarget', selectTarget),
    vscode.commands.registerCommand('mirrord.showSession', () => output.show(true)),
    vscode.commands.registerCommand('mirrord.runDoctor', () =>
      runDoctor(cli(), cwd(), output, tell),
    ),
    vscode.commands.registerCommand('mirrord.openConfig', async () => {
      const folder = cwd();
      if (!folder) return tell('open a folder first: mirrord.json lives in the workspace folder');
      const file = join(folder, 'mirrord.json');
      // An empty object is a valid mirrord.json: the file is there to be written in.
      if (!existsSync(file)) writeFileSync(file, '{\n}\n');
      await vscode.window.showTextDocument(vscode.Uri.file(file));
    }),
  );
  showIdle();
}

/** The window closes: every session ends, and its agent is removed. */
export async function deactivate(): Promise<void> {
  await debug?.stopAll();
}

/** `mirrord doctor` in the output channel; a failed check is a notification too. */
function runDoctor(
  cli: Cli,
  cwd: string | undefined,
  output: vscode.OutputChannel,
  tell: (line: string) => void,
): void {
  output.show(true);
  output.appendLine('mirrord doctor');
  const child = run(cli, ['doctor'], cwd);
  child.stdin.end();
  child.stdout.on('data', (chunk: Buffer) => output.append(chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => output.append(chunk.toString()));
  child.once('error', (error) => tell(startFailure(cli, error)));
  child.once('close', (code) => {
    if (code !== 0) tell('a doctor check failed: see the mirrord output channel');
  });
}
