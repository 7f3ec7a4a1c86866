/**
 * Runs what the user debugs under mirrord: a debug configuration provider for every debugger
 * type that, while mirrord is on, starts a session for the workspace's target and puts the
 * session's environment into the configuration; the session ends with the debug session.
 */
import * as vscode from 'vscode';
import {
  unjoinable,
  withSessionEnvironment,
  type DebugConfigurationLike,
} from './debug-environment';
import { MirrordSession } from './session';
import type { Target } from './targets';

/** Marks a configuration that joined a session, so that its debug session's end stops it. */
const SESSION_KEY = '__mirrordSession';

export interface DebugHost {
  enabled(): boolean;
  /** The workspace's target, asked for when it has none; undefined: the user dismissed it. */
  target(): Promise<Target | undefined>;
  startSession(target: Target, cwd: string | undefined): MirrordSession;
}

export class MirrordDebug implements vscode.DebugConfigurationProvider, vscode.Disposable {
  readonly #sessions = new Map<string, MirrordSession>();
  readonly #subscriptions: vscode.Disposable[];
  #next = 0;

  constructor(private readonly host: DebugHost) {
    this.#subscriptions = [
      vscode.debug.registerDebugConfigurationProvider('*', this),
      vscode.debug.onDidTerminateDebugSession((debug) => {
        const id = debug.configuration[SESSION_KEY] as string | undefined;
        const session = id === undefined ? undefined : this.#sessions.get(id);
        if (!session) return;
        this.#sessions.delete(id!);
        void session.stop();
      }),
    ];
  }

  async resolveDebugConfigurationWithSubstitutedVariables(
    folder: vscode.WorkspaceFolder | undefined,
    configuration: vscode.DebugConfiguration,
  ): Promise<vscode.DebugConfiguration | undefined> {
    // A configuration already resolved, or a child session a debugger starts for a process of
    // its own launch (js-debug's, with `__pendingTargetId`): that process joined already.
    const child = configuration.__pendingTargetId !== undefined;
    if (!this.host.enabled() || child || configuration[SESSION_KEY] !== undefined) {
      return configuration;
    }
    const reason = unjoinable(configuration as DebugConfigurationLike);
    if (reason) {
      void vscode.window.showWarningMessage(`mirrord: ${reason}`);
      return configuration;
    }
    const target = await this.host.target();
    if (!target) return undefined;
    const session = this.host.startSession(target, folder?.uri.fsPath);
    let environment: Record<string, string>;
    try {
      environment = await session.joined;
    } catch {
      // Told by the session's error event, with the CLI's line.
      return undefined;
    }
    const id = String(this.#next++);
    this.#sessions.set(id, session);
    const resolved = withSessionEnvironment(configuration as DebugConfigurationLike, environment);
    return { ...resolved, [SESSION_KEY]: id } as vscode.DebugConfiguration;
  }

  /** Ends every session (the window closes, or mirrord was turned off). */
  async stopAll(): Promise<void> {
    const sessions = [...this.#sessions.values()];
    this.#sessions.clear();
    await Promise.all(sessions.map((session) => session.stop()));
  }

  dispose(): void {
    for (const subscription of this.#subscriptions) subscription.dispose();
  }
}
