/* OHIF configuration of abscess-node.
 *
 * The viewer is a static folder served by the node's own Orthanc (ServeFolders plugin) at /ohif/,
 * and reads studies from the same Orthanc through its DICOMweb plugin at /dicom-web: one origin,
 * no proxy, no CORS, nothing fetched from the internet. viewer/prepare.mjs copies this file over
 * the app-config.js of the prebuilt @ohif/app dist.
 */
(function () {
  const dicomWeb = window.location.origin + '/dicom-web';

  window.config = {
    routerBasename: '/ohif',
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    // Two cores on the CI machine: keep the decoding workers few.
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    // Research software: the node's SEG says "not for clinical use" itself; no start-up dialog.
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 4, prefetch: 8 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'orthanc',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'orthanc',
        configuration: {
          friendlyName: 'abscess-node (Orthanc DICOMweb)',
          name: 'orthanc',
          qidoRoot: dicomWeb,
          wadoRoot: dicomWeb,
          wadoUriRoot: dicomWeb,
          qidoSupportsIncludeField: false,
          supportsReject: false,
          supportsFuzzyMatching: true,
          supportsWildcard: true,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          staticWado: false,
          dicomUploadEnabled: false,
          singlepart: 'bulkdata,video,pdf',
          // Orthanc sends the stored transfer syntax as it is; no server-side transcoding.
          acceptHeader: ['multipart/related; type=application/octet-stream; transfer-syntax=*'],
          bulkDataURI: { enabled: true },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
  };
})();
