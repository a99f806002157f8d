// The relay's whole Azure footprint for `azd up`: a resource group holding a Flex Consumption
// function app that reaches storage, Key Vault and Application Insights by its user-assigned
// identity (no keys, no connection strings). Secrets arrive as @secure() parameters and live only
// in Key Vault; the app settings hold Key Vault references to them.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name: names the resource group and seeds every resource name.')
param environmentName string

// The regions that offer Flex Consumption (`az functionapp list-flexconsumption-locations`; the same
// list as Azure-Samples' Flex Consumption azd templates, less the eastus2euap canary). A region
// outside it fails here, before anything is created. Add a region here when Azure adds it.
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@description('Azure region of every resource (one that offers Flex Consumption).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the deploying user (azd fills it in).')
param principalId string = ''

@description('Give the deploying principal data access (Storage Blob/Table/Queue data roles, Key Vault Secrets User) to run the relay locally against these resources. Off in production, where a CI service principal deploys.')
param deployerDataAccess bool = true

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal principalId is (a CI pipeline deploys as a ServicePrincipal).')
param principalType string = 'User'

@minValue(1)
@maxValue(1000)
@description('Most instances Flex Consumption may scale out to: the ceiling on concurrent cost.')
param maximumInstanceCount int = 40

@allowed([
  512
  2048
  4096
])
@description('Memory of each instance in MB; billing is per GB-second, so smaller is cheaper.')
param instanceMemoryMB int = 2048

@description('Daily ingestion cap of the Log Analytics workspace in GB (-1: no cap).')
param logDailyCapGb int = 1

@description('Where the alerts (infra/modules/alerts.bicep) are e-mailed; empty: no alert rules at all, since a rule that tells nobody costs money for nothing.')
param alertEmail string = ''

@minValue(0)
@description('Direct Line answers of 429 (throttled) in 5 minutes above which an alert fires.')
param alertThrottleThreshold int = 10

@description('Key Vault purge protection: on for production (a deleted vault cannot be purged for 7 days, and the setting is permanent); off by default so `azd down --purge` frees the vault\'s name for the next `azd up`.')
param keyVaultPurgeProtection bool = false

// Secrets: stored in Key Vault, referenced from app settings. Empty means the channel is off.
@secure()
@description('DIRECTLINE_SECRET: the bot\'s Direct Line channel secret. Give exactly one of it and directLineTokenEndpoint.')
param directLineSecret string = ''

@secure()
@description('TWILIO_AUTH_TOKEN (enables the twilio channel).')
param twilioAuthToken string = ''

@secure()
@description('WHATSAPP_APP_SECRET (enables the whatsapp channel).')
param whatsAppAppSecret string = ''

@secure()
@description('WHATSAPP_VERIFY_TOKEN: echoed in Meta\'s webhook verification handshake.')
param whatsAppVerifyToken string = ''

@secure()
@description('WHATSAPP_ACCESS_TOKEN: Graph API token for replies.')
param whatsAppAccessToken string = ''

@secure()
@description('MESSAGEBIRD_SIGNING_KEY (enables the messagebird channel).')
param messageBirdSigningKey string = ''

@secure()
@description('MESSAGEBIRD_ACCESS_KEY: Conversations API key for replies.')
param messageBirdAccessKey string = ''

@secure()
@description('LINE_CHANNEL_SECRET (enables the line channel).')
param lineChannelSecret string = ''

@secure()
@description('LINE_CHANNEL_ACCESS_TOKEN: Messaging API token for replies, pushes and users\' media.')
param lineChannelAccessToken string = ''

@secure()
@description('BIRD_SIGNING_KEY (enables the bird channel).')
param birdSigningKey string = ''

@secure()
@description('BIRD_ACCESS_KEY: Bird API key for replies.')
param birdAccessKey string = ''

@secure()
@description('TELEGRAM_WEBHOOK_SECRET: the webhook\'s secret_token (enables the telegram channel).')
param telegramWebhookSecret string = ''

@secure()
@description('TELEGRAM_BOT_TOKEN: the bot\'s token for replies and files.')
param telegramBotToken string = ''

@secure()
@description('GENERIC_WEBHOOK_SECRET (enables the generic channel).')
param genericWebhookSecret string = ''

@secure()
@description('GENERIC_CALLBACK_SECRET: signs the replies (empty: the webhook secret does).')
param genericCallbackSecret string = ''

@secure()
@description('VONAGE_SIGNATURE_SECRET (enables the vonage channel): the account\'s signature secret.')
param vonageSignatureSecret string = ''

@secure()
@description('VONAGE_PRIVATE_KEY: the Vonage application\'s private key (PEM), signing each reply\'s JWT.')
param vonagePrivateKey string = ''

@secure()
@description('RELAY_EVENT_WEBHOOK_SECRET: Standard Webhooks secret (whsec_...) signing the bot\'s events.')
param eventWebhookSecret string = ''

// Plain settings: empty means the relay's own default (see the README's settings table).
@description('DIRECTLINE_TOKEN_ENDPOINT: a Copilot Studio agent\'s token endpoint, instead of directLineSecret (no secret anywhere). Give exactly one of the two.')
param directLineTokenEndpoint string = ''

@description('DIRECTLINE_ENDPOINT: Direct Line base URL (regional bots set their own; with a token endpoint, empty discovers it from the agent\'s environment).')
param directLineEndpoint string = ''

@description('DIRECTLINE_BOT_IDS: comma-separated bot handles.')
param directLineBotIds string = ''

@description('RELAY_POLL_SCHEDULE: six-field NCRONTAB schedule of the poller (empty: every second).')
param pollSchedule string = ''

@description('RELAY_FANOUT_THRESHOLD: more conversations due in one tick than this go over the poll queue (empty: 500; 0: never).')
param fanoutThreshold string = ''

@description('RELAY_OMNICHANNEL_CONTEXT: JSON of per-channel channelData for Omnichannel (see the README).')
param omnichannelContext string = ''

@description('RELAY_EVENT_WEBHOOK_URL: where the bot\'s events (handoff.initiate...) are POSTed (empty: logged only).')
param eventWebhookUrl string = ''

@description('WEBCHAT_ALLOWED_ORIGINS: comma-separated origins allowed to call the token endpoints.')
param webChatAllowedOrigins string = ''

@description('WEBCHAT_DEMO_ENABLED: serve the Web Chat demo page (true/false).')
param webChatDemoEnabled string = ''

@description('WEBCHAT_BUNDLE_URL: where the demo page loads Web Chat from (empty: Microsoft\'s published bundle).')
param webChatBundleUrl string = ''

@description('WEBCHAT_PROXY_HOPS: proxies of your own (Front Door, API Management) in front of the app (empty: none).')
param webChatProxyHops string = ''

@description('WEBCHAT_SESSION_HOURS: how long a Web Chat page may be away and still resume its conversation (empty: 24).')
param webChatSessionHours string = ''

@description('TWILIO_ACCOUNT_SID.')
param twilioAccountSid string = ''

@description('WHATSAPP_PHONE_NUMBER_ID: the number replies are sent from.')
param whatsAppPhoneNumberId string = ''

@description('BIRD_WORKSPACE_ID.')
param birdWorkspaceId string = ''

@description('BIRD_CHANNEL_ID: the channel replies are sent on.')
param birdChannelId string = ''

@description('GENERIC_SIGNATURE_SCHEME: hmac or standard.')
param genericSignatureScheme string = ''

@description('GENERIC_SIGNATURE_HEADER.')
param genericSignatureHeader string = ''

@description('GENERIC_SIGNATURE_PREFIX.')
param genericSignaturePrefix string = ''

@description('GENERIC_SIGNATURE_ENCODING: hex or base64.')
param genericSignatureEncoding string = ''

@description('GENERIC_TIMESTAMP_HEADER.')
param genericTimestampHeader string = ''

@description('GENERIC_CALLBACK_URL: where the bot\'s replies are POSTed.')
param genericCallbackUrl string = ''

@description('VONAGE_APPLICATION_ID: the Vonage application replies are sent as.')
param vonageApplicationId string = ''

@description('VONAGE_API_BASE: a regional Messages API host (empty: https://api.nexmo.com).')
param vonageApiBase string = ''

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}

// Key Vault secret names (letters, digits, dashes) of the secret settings, with their values.
var secrets = {
  'directline-secret': directLineSecret
  'twilio-auth-token': twilioAuthToken
  'whatsapp-app-secret': whatsAppAppSecret
  'whatsapp-verify-token': whatsAppVerifyToken
  'whatsapp-access-token': whatsAppAccessToken
  'messagebird-signing-key': messageBirdSigningKey
  'messagebird-access-key': messageBirdAccessKey
  'line-channel-secret': lineChannelSecret
  'line-channel-access-token': lineChannelAccessToken
  'bird-signing-key': birdSigningKey
  'bird-access-key': birdAccessKey
  'telegram-webhook-secret': telegramWebhookSecret
  'telegram-bot-token': telegramBotToken
  'generic-webhook-secret': genericWebhookSecret
  'generic-callback-secret': genericCallbackSecret
  'vonage-signature-secret': vonageSignatureSecret
  'vonage-private-key': vonagePrivateKey
  'relay-event-webhook-secret': eventWebhookSecret
}
// An app setting resolved from Key Vault by the app's identity; an unresolved one reaches the
// relay as this literal text, which relay/settings.py rejects with a message naming the setting.
var kvRef = '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/'

resource rg 'Microsoft.Resources/resourceGroups@2022-09-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-relay-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
    dailyCapGb: logDailyCapGb
  }
}

module alerts 'modules/alerts.bicep' = if (!empty(alertEmail)) {
  name: 'alerts'
  scope: rg
  params: {
    location: location
    tags: tags
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    actionGroupName: 'ag-relay-${resourceToken}'
    ruleNamePrefix: 'alert-relay-${resourceToken}-'
    environmentName: environmentName
    alertEmail: alertEmail
    directLineThrottleThreshold: alertThrottleThreshold
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: 'app-package'
  }
}

module keyVault 'modules/key-vault.bicep' = {
  name: 'key-vault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    purgeProtection: keyVaultPurgeProtection
    workspaceId: monitoring.outputs.workspaceId
    secrets: secrets
  }
}

module roles 'modules/role-assignments.bicep' = {
  name: 'role-assignments'
  scope: rg
  params: {
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: deployerDataAccess ? principalId : ''
    userPrincipalType: principalType
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    keyVaultName: keyVault.outputs.name
  }
}

module app 'modules/function-app.bicep' = {
  name: 'function-app'
  scope: rg
  // The identity's roles first: the host reaches storage and resolves Key Vault references by them.
  dependsOn: [
    roles
  ]
  params: {
    name: 'func-relay-${resourceToken}'
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: storage.outputs.deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    // The relay's own settings (relay/settings.py); the module adds the platform and storage ones.
    // Secret settings are Key Vault references, empty when the deployer gave no value.
    relaySettings: {
      DIRECTLINE_SECRET: empty(directLineSecret) ? '' : '${kvRef}directline-secret/)'
      DIRECTLINE_TOKEN_ENDPOINT: directLineTokenEndpoint
      DIRECTLINE_ENDPOINT: directLineEndpoint
      DIRECTLINE_BOT_IDS: directLineBotIds
      RELAY_POLL_SCHEDULE: empty(pollSchedule) ? '* * * * * *' : pollSchedule
      // The host resolves %RELAY_POLL_QUEUE% in poll_batch's queue trigger itself: it must be set.
      RELAY_POLL_QUEUE: 'relay-poll'
      RELAY_FANOUT_THRESHOLD: fanoutThreshold
      RELAY_OMNICHANNEL_CONTEXT: omnichannelContext
      RELAY_EVENT_WEBHOOK_URL: eventWebhookUrl
      RELAY_EVENT_WEBHOOK_SECRET: empty(eventWebhookSecret) ? '' : '${kvRef}relay-event-webhook-secret/)'
      WEBCHAT_ALLOWED_ORIGINS: webChatAllowedOrigins
      WEBCHAT_DEMO_ENABLED: webChatDemoEnabled
      WEBCHAT_BUNDLE_URL: webChatBundleUrl
      WEBCHAT_PROXY_HOPS: webChatProxyHops
      WEBCHAT_SESSION_HOURS: webChatSessionHours
      TWILIO_ACCOUNT_SID: twilioAccountSid
      TWILIO_AUTH_TOKEN: empty(twilioAuthToken) ? '' : '${kvRef}twilio-auth-token/)'
      WHATSAPP_APP_SECRET: empty(whatsAppAppSecret) ? '' : '${kvRef}whatsapp-app-secret/)'
      WHATSAPP_VERIFY_TOKEN: empty(whatsAppVerifyToken) ? '' : '${kvRef}whatsapp-verify-token/)'
      WHATSAPP_ACCESS_TOKEN: empty(whatsAppAccessToken) ? '' : '${kvRef}whatsapp-access-token/)'
      WHATSAPP_PHONE_NUMBER_ID: whatsAppPhoneNumberId
      MESSAGEBIRD_SIGNING_KEY: empty(messageBirdSigningKey) ? '' : '${kvRef}messagebird-signing-key/)'
      MESSAGEBIRD_ACCESS_KEY: empty(messageBirdAccessKey) ? '' : '${kvRef}messagebird-access-key/)'
      LINE_CHANNEL_SECRET: empty(lineChannelSecret) ? '' : '${kvRef}line-channel-secret/)'
      LINE_CHANNEL_ACCESS_TOKEN: empty(lineChannelAccessToken) ? '' : '${kvRef}line-channel-access-token/)'
      BIRD_SIGNING_KEY: empty(birdSigningKey) ? '' : '${kvRef}bird-signing-key/)'
      BIRD_ACCESS_KEY: empty(birdAccessKey) ? '' : '${kvRef}bird-access-key/)'
      BIRD_WORKSPACE_ID: birdWorkspaceId
      BIRD_CHANNEL_ID: birdChannelId
      TELEGRAM_WEBHOOK_SECRET: empty(telegramWebhookSecret) ? '' : '${kvRef}telegram-webhook-secret/)'
      TELEGRAM_BOT_TOKEN: empty(telegramBotToken) ? '' : '${kvRef}telegram-bot-token/)'
      GENERIC_WEBHOOK_SECRET: empty(genericWebhookSecret) ? '' : '${kvRef}generic-webhook-secret/)'
      GENERIC_SIGNATURE_SCHEME: genericSignatureScheme
      GENERIC_SIGNATURE_HEADER: genericSignatureHeader
      GENERIC_SIGNATURE_PREFIX: genericSignaturePrefix
      GENERIC_SIGNATURE_ENCODING: genericSignatureEncoding
      GENERIC_TIMESTAMP_HEADER: genericTimestampHeader
      GENERIC_CALLBACK_URL: genericCallbackUrl
      GENERIC_CALLBACK_SECRET: empty(genericCallbackSecret) ? '' : '${kvRef}generic-callback-secret/)'
      VONAGE_SIGNATURE_SECRET: empty(vonageSignatureSecret) ? '' : '${kvRef}vonage-signature-secret/)'
      VONAGE_APPLICATION_ID: vonageApplicationId
      VONAGE_PRIVATE_KEY: empty(vonagePrivateKey) ? '' : '${kvRef}vonage-private-key/)'
      VONAGE_API_BASE: vonageApiBase
    }
  }
}

// What azd keeps in the environment (`azd env get-values`) and prints after `azd up`.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_RELAY_IDENTITY_CLIENT_ID string = identity.outputs.clientId

// Where the world reaches the relay.
output RELAY_URL string = app.outputs.url
output RELAY_HEALTH_URL string = '${app.outputs.url}/api/health'
output DIRECTLINE_TOKEN_URL string = '${app.outputs.url}/api/directline/token'
output TWILIO_WEBHOOK_URL string = '${app.outputs.url}/api/channels/twilio'
output WHATSAPP_WEBHOOK_URL string = '${app.outputs.url}/api/channels/whatsapp'
output MESSAGEBIRD_WEBHOOK_URL string = '${app.outputs.url}/api/channels/messagebird'
output LINE_WEBHOOK_URL string = '${app.outputs.url}/api/channels/line'
output BIRD_WEBHOOK_URL string = '${app.outputs.url}/api/channels/bird'
output TELEGRAM_WEBHOOK_URL string = '${app.outputs.url}/api/channels/telegram'
output GENERIC_WEBHOOK_URL string = '${app.outputs.url}/api/channels/generic'
output VONAGE_WEBHOOK_URL string = '${app.outputs.url}/api/channels/vonage'
