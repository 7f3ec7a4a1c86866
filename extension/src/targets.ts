/**
 * The target a workspace mirrors: picked from what `mirrord ls` lists (the current context's
 * namespace, and this machine's network namespaces where the editor runs as root), and
 * remembered per workspace.
 */
import * as vscode from 'vscode';
import { runJson, type Cli } from './cli';

/** A target as the CLI's flags name it. */
export interface Target {
  /** `pod/api-7f9`, `deployment/api`, `netns/staging`, `pid/4242`. */
  label: string;
  /** The flags that name it for `mirrord session`. */
  args: string[];
}

/** An entry of `mirrord ls --json` (Kubernetes) or `mirrord ls --local --json`. */
interface Listed {
  target: string;
  kind: string;
  name: string;
  namespace?: string;
  ready?: string;
  mirrorable?: boolean;
}

const STATE_KEY = 'mirrord.target';

export function rememberedTarget(state: vscode.Memento): Target | undefined {
  return state.get<Target>(STATE_KEY);
}

type Item = vscode.QuickPickItem & { target?: Target; askPid?: true };

function itemOf(listed: Listed): Item {
  const namespace = listed.namespace ? ['-n', listed.namespace] : [];
  const target = { label: listed.target, args: [`--${listed.kind}`, listed.name, ...namespace] };
  const ready = listed.ready ? `ready ${listed.ready}` : '';
  return {
    label: listed.target,
    description: [listed.namespace, ready].filter(Boolean).join(' · '),
    detail: listed.mirrorable === false ? 'no running, ready pod now' : undefined,
    target,
  };
}

/**
 * Asks for the target with a quick pick and remembers it; undefined when the user dismissed
 * it. The pick opens at once and fills as the listings come. What cannot be listed (no
 * kubeconfig, RBAC) is told in a notification with the CLI's own line, and the rest is offered.
 */
export async function pickTarget(
  cli: Cli,
  cwd: string | undefined,
  state: vscode.Memento,
  tell: (line: string) => void,
): Promise<Target | undefined> {
  const local = process.getuid?.() === 0;
  const pick = vscode.window.createQuickPick<Item>();
  pick.title = 'mirrord: Select Target';
  pick.placeholder = 'The target whose traffic and context the debuggee gets';
  pick.matchOnDescription = true;
  pick.busy = true;
  const kube: Item[] = [];
  const machine: Item[] = [];
  const show = () => {
    const sections: [string, Item[]][] = [
      ['Kubernetes', kube],
      ['This machine', machine],
    ];
    pick.items = sections.flatMap(([label, items]) =>
      items.length ? [{ label, kind: vscode.QuickPickItemKind.Separator }, ...items] : [],
    );
  };
  const listings = [
    runJson<{ targets: Listed[] }>(cli, ['ls'], cwd).then(
      ({ targets }) => kube.push(...targets.map(itemOf)),
      (error: Error) => tell(`cannot list Kubernetes targets: ${error.message}`),
    ),
  ];
  if (local) {
    machine.push({ label: 'Process ID…', description: 'a local process (--pid)', askPid: true });
    listings.push(
      runJson<{ targets: Listed[] }>(cli, ['ls', '--local'], cwd).then(
        ({ targets }) => machine.unshift(...targets.map(itemOf)),
        (error: Error) => tell(`cannot list network namespaces: ${error.message}`),
      ),
    );
  }
  for (const listing of listings) void listing.then(show);
  void Promise.all(listings).then(() => (pick.busy = false));
  show();
  pick.show();
  const picked = await new Promise<Item | undefined>((resolve) => {
    pick.onDidAccept(() => resolve(pick.selectedItems[0]));
    pick.onDidHide(() => resolve(undefined));
  });
  pick.dispose();
  let target = picked?.target;
  if (picked?.askPid) {
    const pid = await vscode.window.showInputBox({
      title: 'mirrord: Process ID',
      prompt: 'The local process whose network namespace to mirror',
      validateInput: (value) =>
        /^[1-9]\d*$/.test(value) ? undefined : 'a process ID, such as 4242',
    });
    if (pid) target = { label: `pid/${pid}`, args: ['--pid', pid] };
  }
  if (target) await state.update(STATE_KEY, target);
  return target;
}
