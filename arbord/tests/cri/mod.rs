//! CRI helpers shared by the test files that include this module (`mod cri;`).

use std::path::Path;

/// Pulls `image` through containerd's CRI image service (`runtime.v1.ImageService/PullImage`).
pub fn cri_pull(socket: &Path, image: &str) -> Result<String, tonic::Status> {
    use arbor_proto::cri::image_service_client::ImageServiceClient;
    use arbor_proto::cri::{ImageSpec as CriImage, PullImageRequest};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = arbor_proto::connect(socket)
            .await
            .expect("connecting to containerd");
        let mut c = ImageServiceClient::new(ch);
        let r = c
            .pull_image(PullImageRequest {
                image: Some(CriImage {
                    image: image.into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await?;
        Ok(r.into_inner().image_ref)
    })
}
