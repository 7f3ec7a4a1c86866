import { RESOURCES, apiVersionOf, type ResourceType } from './types.js';

/**
 * `/version` and the discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION`),
 * so that kubectl and other discovery-driven clients find the resources the stand-in serves.
 */

const VERBS: Record<string, string[]> = {
  pods: ['delete', 'get', 'list', 'watch'],
  namespaces: ['get', 'list', 'watch'],
  nodes: ['get', 'list', 'watch'],
  jobs: ['create', 'delete', 'get', 'list', 'watch'],
  deployments: ['delete', 'get', 'list', 'watch'],
  replicasets: ['delete', 'get', 'list', 'watch'],
  statefulsets: ['delete', 'get', 'list', 'watch'],
};

const SHORT_NAMES: Record<string, string[]> = {
  pods: ['po'],
  namespaces: ['ns'],
  nodes: ['no'],
  deployments: ['deploy'],
  replicasets: ['rs'],
  statefulsets: ['sts'],
};

function resourceList(groupVersion: string): object | undefined {
  const resources = Object.values(RESOURCES).filter((r) => apiVersionOf(r) === groupVersion);
  if (resources.length === 0) return undefined;
  const entry = (r: ResourceType, name: string, verbs: string[], kind = r.kind): object => ({
    name,
    singularName: name.includes('/') ? '' : r.kind.toLowerCase(),
    namespaced: r.namespaced,
    kind,
    verbs,
    ...(SHORT_NAMES[name] ? { shortNames: SHORT_NAMES[name] } : {}),
  });
  const entries = resources.flatMap((r) => [
    entry(r, r.plural, VERBS[r.plural] ?? ['get', 'list']),
    ...(r.plural === 'pods'
      ? [
          entry(r, 'pods/log', ['get']),
          entry(r, 'pods/portforward', ['create', 'get'], 'PodPortForwardOptions'),
        ]
      : []),
  ]);
  return { kind: 'APIResourceList', apiVersion: 'v1', groupVersion, resources: entries };
}

export const discovery = {
  version: {
    major: '1',
    minor: '31',
    gitVersion: 'v1.31.0-mirrord-stand-in',
    gitCommit: '0000000000000000000000000000000000000000',
    gitTreeState: 'clean',
    buildDate: '2024-08-13T07:28:49Z',
    goVersion: 'go1.22.5',
    compiler: 'gc',
    platform: 'linux/amd64',
  },

  /** The discovery document at `path`, or undefined if it is not a discovery path. */
  document(path: string, serverUrl: string): object | undefined {
    if (path === '/api') {
      return {
        kind: 'APIVersions',
        versions: ['v1'],
        serverAddressByClientCIDRs: [
          { clientCIDR: '0.0.0.0/0', serverAddress: serverUrl.replace(/^https:\/\//, '') },
        ],
      };
    }
    if (path === '/apis') {
      const groups = [
        ...new Set(
          Object.values(RESOURCES)
            .map((r) => r.group)
            .filter(Boolean),
        ),
      ];
      return {
        kind: 'APIGroupList',
        apiVersion: 'v1',
        groups: groups.map((name) => {
          const version = { groupVersion: `${name}/v1`, version: 'v1' };
          return { name, versions: [version], preferredVersion: version };
        }),
      };
    }
    const api = /^\/api\/(v1)$/.exec(path);
    if (api) return resourceList(api[1] ?? '');
    const apis = /^\/apis\/([^/]+\/[^/]+)$/.exec(path);
    if (apis) return resourceList(apis[1] ?? '');
    return undefined;
  },
};
