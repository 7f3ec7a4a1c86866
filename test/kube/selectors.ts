import { badRequest } from './errors.js';
import type { KubeObject, LabelSelector } from './types.js';

/** `labelSelector` and `fieldSelector` query parameters, and LabelSelector objects. */

export type ObjectFilter = (object: KubeObject) => boolean;

interface Requirement {
  key: string;
  operator: 'in' | 'notin' | 'exists' | '!';
  values: string[];
}

/** Splits at commas outside parentheses: `a in (x,y),b` is two requirements. */
function splitTerms(selector: string): string[] {
  const terms: string[] = [];
  let depth = 0;
  let current = '';
  for (const char of selector) {
    if (char === '(') depth += 1;
    if (char === ')') depth -= 1;
    if (char === ',' && depth === 0) {
      terms.push(current.trim());
      current = '';
    } else {
      current += char;
    }
  }
  if (current.trim()) terms.push(current.trim());
  return terms;
}

function parseRequirement(term: string, kind: string): Requirement {
  const set = /^(\S+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(term);
  if (set) {
    const values = (set[3] ?? '').split(',').map((v) => v.trim());
    return { key: set[1] ?? '', operator: set[2] as 'in' | 'notin', values };
  }
  const equality = /^([^=!\s]+)\s*(==|=|!=)\s*(\S*)$/.exec(term);
  if (equality) {
    const value = equality[3] ?? '';
    return {
      key: equality[1] ?? '',
      operator: equality[2] === '!=' ? 'notin' : 'in',
      values: [value],
    };
  }
  if (/^![^=!\s]+$/.test(term)) return { key: term.slice(1), operator: '!', values: [] };
  if (/^[^=!\s(),]+$/.test(term)) return { key: term, operator: 'exists', values: [] };
  throw badRequest(`unable to parse requirement: invalid ${kind} selector "${term}"`);
}

function matches(requirement: Requirement, value: string | undefined): boolean {
  switch (requirement.operator) {
    case 'in':
      return value !== undefined && requirement.values.includes(value);
    case 'notin':
      return value === undefined || !requirement.values.includes(value);
    case 'exists':
      return value !== undefined;
    case '!':
      return value === undefined;
  }
}

export function parseLabelSelector(selector: string | undefined): ObjectFilter {
  if (!selector) return () => true;
  const requirements = splitTerms(selector).map((term) => parseRequirement(term, 'label'));
  return (object) => requirements.every((r) => matches(r, object.metadata.labels?.[r.key]));
}

/** The fields the real API server lets clients select on, for the resources served here. */
function fieldValue(object: KubeObject, field: string): string | undefined {
  const loose = object as unknown as {
    spec?: { nodeName?: string };
    status?: { phase?: string };
  };
  switch (field) {
    case 'metadata.name':
      return object.metadata.name;
    case 'metadata.namespace':
      return object.metadata.namespace;
    case 'spec.nodeName':
      return loose.spec?.nodeName ?? '';
    case 'status.phase':
      return loose.status?.phase ?? '';
    default:
      throw badRequest(`field label not supported: ${field}`);
  }
}

export function parseFieldSelector(selector: string | undefined): ObjectFilter {
  if (!selector) return () => true;
  const requirements = splitTerms(selector).map((term) => parseRequirement(term, 'field'));
  for (const r of requirements) {
    if (r.operator !== 'in' && r.operator !== 'notin') {
      throw badRequest(`invalid field selector "${selector}": only =, == and != are supported`);
    }
  }
  return (object) => requirements.every((r) => matches(r, fieldValue(object, r.key)));
}

/** A LabelSelector object (matchLabels and matchExpressions), as workloads and Jobs carry. */
export function labelSelectorMatches(
  selector: LabelSelector,
  labels: Record<string, string> | undefined,
): boolean {
  const own = labels ?? {};
  for (const [key, value] of Object.entries(selector.matchLabels ?? {})) {
    if (own[key] !== value) return false;
  }
  for (const expression of selector.matchExpressions ?? []) {
    const value = own[expression.key];
    const values = expression.values ?? [];
    const ok =
      expression.operator === 'In'
        ? value !== undefined && values.includes(value)
        : expression.operator === 'NotIn'
          ? value === undefined || !values.includes(value)
          : expression.operator === 'Exists'
            ? value !== undefined
            : value === undefined;
    if (!ok) return false;
  }
  return true;
}
