/**
 * Which of the app's destinations go through the target (the `outgoing` feature's one
 * decision, made in the layer from what this module gives it): every destination does, but
 * for those a rule keeps on this machine, and localhost when the user says it is this
 * machine's.
 *
 * localhost is the target's by default: in a pod, localhost is where the sidecars listen (a
 * mesh proxy, a database proxy, a secrets agent), and an app that thinks it runs in staging
 * expects them there. `--localhost local` makes it this machine's, for a developer who runs
 * those locally.
 */
import { isIP } from 'node:net';

export const LOCALHOST_MODES = ['remote', 'local'] as const;
export type LocalhostMode = (typeof LOCALHOST_MODES)[number];

export interface OutgoingSettings {
  /** Off: every connection and look-up stays on this machine. */
  enabled: boolean;
  /** Destinations that stay local: CIDR|HOST[:PORT] (see outgoingRuleProblem). */
  local: string[];
  localhost: LocalhostMode;
}

export const OUTGOING_RULE = 'CIDR or HOST, with :PORT for one port ([IPV6]:PORT)';

/** A name as DNS allows it, with `*` for any labels (`*.internal`). */
const HOST =
  /^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$/i;

function cidrProblem(cidr: string): string | undefined {
  const [address = '', prefix, ...rest] = cidr.split('/');
  const family = isIP(address);
  if (family === 0 || rest.length > 0) return `${address} is not an IP address`;
  if (prefix === undefined) return undefined;
  const bits = Number(prefix);
  const max = family === 4 ? 32 : 128;
  return /^\d+$/.test(prefix) && bits <= max
    ? undefined
    : `/${prefix} is not a prefix from 0 to ${max}`;
}

/** Why `rule` is not an outgoing rule, or undefined when it is one. */
export function outgoingRuleProblem(rule: string): string | undefined {
  let target = rule;
  let port: string | undefined;
  const bracketed = /^\[([^\]]+)\](?::(.*))?$/.exec(rule);
  if (bracketed) {
    target = bracketed[1] ?? '';
    port = bracketed[2];
  } else if ((rule.match(/:/g) ?? []).length === 1) {
    [target = '', port] = rule.split(':');
  }
  if (port !== undefined && !(/^\d+$/.test(port) && Number(port) >= 1 && Number(port) <= 65535)) {
    return `port "${port}" is not from 1 to 65535`;
  }
  if (isIP(target.split('/')[0] ?? '') !== 0 || target.includes('/')) return cidrProblem(target);
  if (bracketed) return `${target} is not an IPv6 address`;
  return HOST.test(target)
    ? undefined
    : `"${target}" is neither an address, a CIDR nor a host name`;
}

/** The layer's settings (layer/outgoing.c reads them), for the app's environment. */
export function layerOutgoingEnvironment(settings: OutgoingSettings): Record<string, string> {
  if (!settings.enabled) return {};
  return {
    MIRRORD_OUTGOING: 'remote',
    MIRRORD_OUTGOING_LOCAL: settings.local.join('\n'),
    MIRRORD_OUTGOING_LOCALHOST: settings.localhost,
  };
}
