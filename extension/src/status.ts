/**
 * The status bar item: whether mirrord is on (clicking it toggles), and while a session runs its
 * target and live counters.
 */
import * as vscode from 'vscode';
import type { Counters } from './session';

function bytes(count: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = count;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

export class StatusItem {
  readonly #item = vscode.window.createStatusBarItem(
    'mirrord.status',
    vscode.StatusBarAlignment.Left,
    0,
  );

  constructor() {
    this.#item.name = 'mirrord';
    this.#item.command = 'mirrord.toggle';
    this.#item.show();
  }

  /** Off, or on with the workspace's target (if it has one yet), no session running. */
  idle(on: boolean, target: string | undefined): void {
    this.#item.text = on ? '$(broadcast) mirrord' : '$(circle-slash) mirrord';
    this.#item.tooltip = on
      ? `mirrord is on${target ? ` (${target})` : ''}: debugging runs under mirrord. Click to turn it off.`
      : 'mirrord is off. Click to mirror a target into what you debug.';
    this.#item.backgroundColor = undefined;
  }

  starting(target: string): void {
    this.#item.text = `$(sync~spin) mirrord: ${target}`;
    this.#item.tooltip = `mirrord is starting a session with ${target}`;
  }

  /** A running session's counters: connections, bytes, lag, and what was dropped, if any. */
  counters(counters: Counters): void {
    const dropped =
      counters.bytesDropped + counters.bytesDroppedAgent + counters.bytesDroppedKernel;
    const lag =
      counters.recentLagP99Ms === null ? '' : ` · lag ${counters.recentLagP99Ms.toFixed(0)} ms`;
    this.#item.text = `$(broadcast) mirrord: ${counters.target} · ${counters.opened} conn · ${bytes(counters.bytesMirrored)}${lag}${dropped > 0 ? ` · dropped ${bytes(dropped)}` : ''}`;
    this.#item.tooltip = `${counters.connectionsOpen} open now, ${counters.opened} mirrored in all; click to turn mirrord off`;
    this.#item.backgroundColor =
      dropped > 0 ? new vscode.ThemeColor('statusBarItem.warningBackground') : undefined;
  }

  dispose(): void {
    this.#item.dispose();
  }
}
