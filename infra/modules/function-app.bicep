// The Flex Consumption (FC1) plan and the function app: Linux, Python 3.11, one user-assigned
// identity for everything, HTTPS only with TLS 1.2, no FTP or basic-auth publishing. The package
// is deployed to a blob container the identity reads, so the storage account needs no keys.
// Flex Consumption rejects the site properties and app settings of the older plans (Learn,
// functions-app-settings#flex-consumption-plan-deprecations: ftpsState, linuxFxVersion,
// FUNCTIONS_WORKER_RUNTIME, WEBSITE_RUN_FROM_PACKAGE, ...); tests/test_infra.py refuses every one.
param name string
param planName string
param location string
param tags object
param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerName string
param applicationInsightsName string
param maximumInstanceCount int
param instanceMemoryMB int
@description('The relay\'s own app settings (relay/settings.py), built by main.bicep.')
param relaySettings object

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: zone redundancy on Flex Consumption is regional and needs always-ready instances; this relay scales to zero to cost nothing when idle
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: the webhooks and token endpoints are public by nature; each request is authenticated by its provider signature or origin
  // checkov:skip=CKV_AZURE_17: messaging providers and browsers present no client certificates
  // checkov:skip=CKV_AZURE_212: scale to zero is the point of Flex Consumption; state is in tables, so no instance needs to stay up for failover
  // checkov:skip=CKV_AZURE_213: platform health-check pings would keep an instance running around the clock; /api/health is there for an external monitor
  // checkov:skip=CKV_AZURE_78: Flex Consumption rejects siteConfig.ftpsState (ARM error 51021, "FTPS not supported"); FTP is off through the ftp basicPublishingCredentialsPolicies below
  name: name
  location: location
  // azd finds the app to deploy `relay` (azure.yaml) to by this tag.
  tags: union(tags, {
    'azd-service-name': 'relay'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// No FTP and no basic-auth (publishing profile) deployments: azd and Core Tools use Entra ID.
resource ftp 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scm 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

// Settings the platform, the host and the relay need in every deployment. No FUNCTIONS_WORKER_RUNTIME:
// Flex Consumption takes the runtime from functionAppConfig and rejects that setting.
var platformSettings = {
  // Identity-based host storage: the host and relay/store/ use the identity, never a key.
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // DefaultAzureCredential picks the user-assigned identity only when this is set.
  AZURE_CLIENT_ID: identityClientId
  // Providers sign over the URL they call: the app's own host name.
  RELAY_PUBLIC_BASE_URL: 'https://${site.properties.defaultHostName}'
}

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov reads every sites/config as the 'web' config; this one is 'appsettings', which holds none
  // of the properties these checks look for:
  // checkov:skip=CKV_AZURE_13: not the web config; and the endpoints are anonymous by design, each webhook is authenticated by its signature
  // checkov:skip=CKV_AZURE_63: not the web config; logs go to Application Insights
  // checkov:skip=CKV_AZURE_65: not the web config; logs go to Application Insights
  // checkov:skip=CKV_AZURE_66: not the web config; logs go to Application Insights
  // checkov:skip=CKV_AZURE_80: not the web config; no .NET here
  // checkov:skip=CKV_AZURE_88: not the web config; Flex Consumption uses no Azure Files share
  // checkov:skip=CKV_AZURE_222: not the web config; see the same skip on the site
  parent: site
  name: 'appsettings'
  properties: union(relaySettings, platformSettings)
}

output name string = site.name
output url string = 'https://${site.properties.defaultHostName}'
