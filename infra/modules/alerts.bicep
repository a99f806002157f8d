// Log search alerts on the relay's own metrics (the meter "relay": customMetrics in Application
// Insights), e-mailed through one action group. The queries live in infra/alerts/*.kql, which the
// README's "Operate" section shows verbatim (tests/test_infra.py checks both), so an operator can
// run by hand exactly what an alert ran. Each query returns the metric's rows; the rule's condition
// aggregates them over its window (Total or Maximum of a column the query gives, or Count of the
// rows) and compares that with its threshold.
//
// Every rule is evaluated every 5 minutes, about the delay of the metrics themselves (exported
// each minute, ingested within minutes): log alerts are billed by how often they run, and a
// shorter interval would cost more without alerting sooner.
// Rules are stateful (autoMitigate): one e-mail when a rule fires, one when it resolves, none in
// between. Severities: 1 (Error) when nothing reaches users, 2 (Warning) when some users are let
// down, 3 (Informational) for pressure the relay absorbs by itself.
param location string
param tags object
param applicationInsightsName string
param actionGroupName string
@description('Prefix of the alert rules\' resource names.')
param ruleNamePrefix string
@description('Shown in every alert\'s name, to tell one deployment\'s e-mails from another\'s.')
param environmentName string
@description('Where the alerts are e-mailed.')
param alertEmail string
@description('Direct Line answers of 429 (throttled) in 5 minutes above which an alert fires.')
param directLineThrottleThreshold int

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: actionGroupName
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'relay'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var rules = [
  // A dead letter is a message or reply that will not arrive unless an operator replays it
  // (`python -m relay.admin dead-letters list`). Any one in 15 minutes.
  {
    name: 'dead-letters'
    title: 'dead letters'
    description: 'Dead letters were written: messages or replies the relay gave up on. List them with `python -m relay.admin dead-letters list`.'
    severity: 2
    windowSize: 'PT15M'
    condition: {
      query: loadTextContent('../alerts/dead-letters.kql')
      timeAggregation: 'Total'
      metricMeasureColumn: 'deadLetters'
      operator: 'GreaterThan'
      threshold: 0
    }
  }
  // A tick raises only when the poller itself cannot work (storage unreachable or refusing the
  // identity): nothing is posted or delivered while it lasts. Any failed tick in 5 minutes.
  {
    name: 'poller-failing'
    title: 'poller failing'
    description: 'Poll ticks failed: while they do, no message is posted to the bot and no reply is delivered.'
    severity: 1
    windowSize: 'PT5M'
    condition: {
      query: loadTextContent('../alerts/poller-failing.kql')
      timeAggregation: 'Total'
      metricMeasureColumn: 'failedTicks'
      operator: 'GreaterThan'
      threshold: 0
    }
  }
  // The failure that leaves no failure behind: the host not running the timer, or the app failing
  // before a tick starts. No successful tick in 15 minutes (the poller ticks every few seconds;
  // a RELAY_POLL_SCHEDULE slower than 15 minutes makes this rule fire).
  {
    name: 'poller-stopped'
    title: 'poller stopped'
    description: 'No successful poll tick in 15 minutes: the poller is not running, or telemetry no longer arrives.'
    severity: 1
    windowSize: 'PT15M'
    condition: {
      query: loadTextContent('../alerts/poller-stopped.kql')
      timeAggregation: 'Count'
      operator: 'LessThan'
      threshold: 1
    }
  }
  // A user message still waiting after 5 minutes: Direct Line is down or refusing the relay.
  {
    name: 'outbox-age'
    title: 'messages waiting'
    description: 'A user message has waited more than 5 minutes to be posted to the bot.'
    severity: 2
    windowSize: 'PT5M'
    condition: {
      query: loadTextContent('../alerts/outbox-age.kql')
      timeAggregation: 'Maximum'
      metricMeasureColumn: 'oldestSeconds'
      operator: 'GreaterThan'
      threshold: 300
    }
  }
  // The relay honours Retry-After, so a few 429s cost only delay; many mean the bot's Direct Line
  // rate limit is the relay's ceiling.
  {
    name: 'directline-throttled'
    title: 'Direct Line throttling'
    description: 'Direct Line answered 429 (too many requests) more often than the threshold in 5 minutes.'
    severity: 3
    windowSize: 'PT5M'
    condition: {
      query: loadTextContent('../alerts/directline-throttled.kql')
      timeAggregation: 'Total'
      metricMeasureColumn: 'throttled'
      operator: 'GreaterThan'
      threshold: directLineThrottleThreshold
    }
  }
]

resource rule 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for item in rules: {
  name: '${ruleNamePrefix}${item.name}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'relay (${environmentName}): ${item.title}'
    description: item.description
    severity: item.severity
    enabled: true
    scopes: [
      applicationInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: item.windowSize
    autoMitigate: true
    criteria: {
      allOf: [
        item.condition
      ]
    }
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}]
